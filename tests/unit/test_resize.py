"""asuka_core.resize against OpenCV itself (the test-only oracle): bit-exact equality."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from asuka_core.resize import area_resize_uint8, nearest_resize_cv


def _cv_area(img_hwc: np.ndarray, h: int, w: int) -> np.ndarray:
    out = cv2.resize(img_hwc, (w, h), interpolation=cv2.INTER_AREA)
    return out[..., None] if out.ndim == 2 else out


def _ours_area(img_hwc: np.ndarray, h: int, w: int) -> np.ndarray:
    x = torch.from_numpy(img_hwc).permute(2, 0, 1)[None].contiguous()
    out = area_resize_uint8(x, (h, w))
    assert out.dtype == torch.uint8 and out.shape == (1, img_hwc.shape[2], h, w)
    return out[0].permute(1, 2, 0).numpy()


def _assert_area_exact(img: np.ndarray, h: int, w: int) -> None:
    ref, ours = _cv_area(img, h, w), _ours_area(img, h, w)
    diff = np.abs(ref.astype(int) - ours.astype(int))
    assert diff.max() == 0, f"{img.shape[:2]} -> {(h, w)}: {int((diff > 0).sum())} pixels differ, max {diff.max()}"


# (src_h, src_w, dst_h, dst_w)
AREA_CASES = [
    (512, 512, 256, 256),    # 2x2 integer: OpenCV's (sum + 2) >> 2 path
    (768, 768, 256, 256),    # 3x3 integer: float reciprocal + round-half-even path
    (1024, 512, 256, 256),   # 4x2 integer, non-square
    (512, 256, 256, 256),    # 2x1 integer (area 4 but not 2x2)
    (300, 300, 256, 256),    # non-integer downscale
    (1000, 700, 256, 256),   # non-integer, non-square
    (720, 1280, 256, 256),   # a 16:9 photo, squashed
    (257, 511, 256, 256),    # barely shrinking
    (17, 23, 5, 7),          # tiny
    (256, 256, 256, 256),    # identity
    (100, 100, 256, 256),    # upscale (OpenCV's bilinear-like fixed-point path)
    (37, 53, 256, 256),      # upscale, non-square
    (255, 256, 256, 256),    # upscale on one axis by one pixel
    (512, 128, 256, 256),    # mixed: shrink rows, enlarge columns
    (128, 512, 256, 256),    # mixed the other way
    (3, 5, 7, 11),
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", AREA_CASES, ids=lambda c: "{}x{}->{}x{}".format(*c))
def test_area_matches_opencv_random_pixels(case, channels):
    sh, sw, dh, dw = case
    img = np.random.default_rng(sh * 1000 + sw).integers(0, 256, (sh, sw, channels), dtype=np.uint8)
    _assert_area_exact(img, dh, dw)


def test_area_matches_opencv_on_random_sizes():
    rng = np.random.default_rng(7)
    for _ in range(60):
        sh, sw = (int(v) for v in rng.integers(1, 500, 2))
        dh, dw = (int(v) for v in rng.integers(1, 300, 2))
        img = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
        _assert_area_exact(img, dh, dw)


@pytest.mark.parametrize("factor", [2, 3, 4, 5])
def test_area_rounding_ties_match_opencv(factor):
    """Two-level images make many box means land exactly on .5 (2x2 rounds up, other
    integer factors round half to even in OpenCV), and near-white images probe the top."""
    rng = np.random.default_rng(factor)
    h, w = 64, 48
    for img in (rng.integers(0, 2, (h * factor, w * factor, 3)).astype(np.uint8) + 100,
                rng.integers(0, 2, (h * factor, w * factor, 3)).astype(np.uint8) * 255,
                rng.integers(250, 256, (h * factor, w * factor, 3)).astype(np.uint8)):
        _assert_area_exact(img, h, w)
        _assert_area_exact(img, h + 3, w - 5)  # same data, fractional factor


def test_area_batch_and_channels_are_independent():
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (3, 4, 90, 70), dtype=np.uint8)  # [B, C, H, W], 4 channels
    out = area_resize_uint8(torch.from_numpy(imgs), (40, 33))
    for b in range(3):
        for c in range(4):
            ref = cv2.resize(np.ascontiguousarray(imgs[b, c]), (33, 40), interpolation=cv2.INTER_AREA)
            assert np.array_equal(out[b, c].numpy(), ref)


def test_area_rejects_non_uint8():
    with pytest.raises(TypeError):
        area_resize_uint8(torch.zeros(1, 3, 8, 8), (4, 4))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_nearest_matches_opencv(dtype):
    rng = np.random.default_rng(11)
    sizes = [(1024, 1024, 256, 256), (768, 768, 256, 256), (300, 420, 256, 256), (100, 37, 256, 256),
             (256, 256, 256, 256), (513, 1025, 256, 256), (7, 9, 20, 3)]
    sizes += [tuple(int(v) for v in (*rng.integers(1, 1200, 2), *rng.integers(1, 400, 2))) for _ in range(40)]
    for sh, sw, dh, dw in sizes:
        src = (rng.random((sh, sw)) * 255).astype(dtype)
        ref = cv2.resize(src, (dw, dh), interpolation=cv2.INTER_NEAREST)
        ours = nearest_resize_cv(torch.from_numpy(src)[None, None], (dh, dw))[0, 0].numpy()
        assert ours.dtype == ref.dtype
        assert np.array_equal(ours, ref), f"{(sh, sw)} -> {(dh, dw)}"


def test_nearest_is_top_left_not_centre_based():
    """OpenCV picks source index floor(dst * scale): for 3x shrink that is 0, 3, 6 ...
    (PIL and 'nearest-exact' would pick the centres 1, 4, 7 ...)."""
    src = torch.arange(9.0).view(1, 1, 1, 9)
    assert nearest_resize_cv(src, (1, 3)).flatten().tolist() == [0.0, 3.0, 6.0]
