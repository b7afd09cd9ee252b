"""asuka_core.poisson against OpenCV's seamlessClone(NORMAL_CLONE) (the test-only oracle)
and HD-Painter's poisson_blend procedure rebuilt here with OpenCV and numpy.

OpenCV works on uint8 and truncates its float32 solution; ours returns the exact float
solution. So the check is: OpenCV's pixel = floor(ours), allowing OpenCV's float32 error,
i.e. ``ours*255 - cv2`` lies in [-TOL, 1 + TOL] for every pixel, after clamping ours to
[0, 255] as OpenCV does.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asuka_core.errors import InputError
from asuka_core.poisson import dilate_box, hd_painter_blend, seamless_clone, solve_dirichlet

TOL = 0.05  # grey levels: OpenCV solves in float32 (two DFTs of size 2N + 2 per axis), we in float64


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients, edges and noise, uint8 HWC."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(float)
    base = np.stack([128 + 100 * np.sin(x / (9 + seed)), 60 + y * 150 / h,
                     (x + 2 * y + 40 * seed) % 256], -1)
    base[h // 3: h // 2, :] += 40  # a hard edge
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def to_t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255


def to_np(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255


def cv_clone_in_place(src, dst, mask):
    """seamlessClone with the patch kept in place (centre of the mask's bounding box, as
    HD-Painter computes it). OpenCV erodes and inverts the mask array it is given, so it
    gets a copy."""
    x, y, w, h = cv2.boundingRect(mask)
    return cv2.seamlessClone(src, dst, mask.copy(), (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)


def assert_floor_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    d = ours - ref.astype(np.float64)
    assert d.min() >= -TOL and d.max() <= 1 + TOL, (d.min(), d.max())
    # and the bulk is not at the edges of that window by accident
    assert np.mean(np.floor(ours + 1e-6) == ref) > 0.99


def test_dirichlet_solver_inverts_the_five_point_laplacian():
    d = torch.randn(3, 17, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = F.pad(d, (1, 1, 1, 1))
    lap = p[:, 2:, 1:-1] + p[:, :-2, 1:-1] + p[:, 1:-1, 2:] + p[:, 1:-1, :-2] - 4 * d
    assert torch.allclose(solve_dirichlet(lap), d, atol=1e-12)


MASKS = {
    "rect": lambda h, w: _rect(h, w, (20, 30, 70, 90)),
    "two_rects": lambda h, w: np.maximum(_rect(h, w, (20, 30, 70, 90)), _rect(h, w, (40, 85, 50, 110))),
    "blob": lambda h, w: _blob(h, w),
    "touches_border": lambda h, w: _rect(h, w, (0, 0, 50, 60)),
}


def _rect(h, w, box):
    m = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = 255
    return m


def _blob(h, w):
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot((y - h * 0.55) / 0.8, x - w * 0.45)
    return ((r < 26) | ((np.abs(y - 30) < 6) & (np.abs(x - 70) < 30))).astype(np.uint8) * 255


@pytest.mark.parametrize("name", sorted(MASKS))
def test_seamless_clone_matches_opencv_binary_masks(name):
    h, w = 96, 128
    src, dst, mask = picture(h, w, 1), picture(h, w, 2), MASKS[name](h, w)
    ref = cv_clone_in_place(src, dst, mask)
    ours = seamless_clone(to_t(src), to_t(dst), torch.from_numpy(mask)[None].double() / 255)
    assert_floor_equal(to_np(ours), ref)


def test_seamless_clone_matches_opencv_soft_mask():
    """A soft (bicubic-resized, as HD-Painter's 2048 mask is) mask: OpenCV weights the
    gradients by the eroded 8-bit values / 255."""
    h, w = 96, 128
    src, dst = picture(h, w, 3), picture(h, w, 4)
    small = np.zeros((24, 32), np.uint8)
    small[6:18, 8:24] = 255
    small[3:21, 3:29][np.abs(np.subtract.outer(np.arange(18), np.arange(26))) < 2] = 255
    mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    assert 0 < np.mean((mask > 0) & (mask < 255))   # really soft
    ref = cv_clone_in_place(src, dst, mask)
    ours = seamless_clone(to_t(src), to_t(dst), torch.from_numpy(mask)[None].double() / 255)
    assert_floor_equal(to_np(ours), ref)


def test_outside_the_bounding_box_is_the_target_exactly():
    h, w = 64, 80
    src, dst = to_t(picture(h, w, 5)).float(), to_t(picture(h, w, 6)).float()
    mask = torch.zeros(1, h, w)
    mask[:, 20:40, 25:50] = 1
    out = seamless_clone(src, dst, mask)
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[21:39, 26:49] = False  # the box minus its 1-pixel ring
    assert torch.equal(out[..., keep], dst[..., keep])
    assert not torch.equal(out, dst)


def test_empty_mask_returns_the_target():
    dst = to_t(picture(32, 32, 7))
    assert torch.equal(seamless_clone(to_t(picture(32, 32, 8)), dst, torch.zeros(1, 32, 32)), dst)


def official_poisson_blend(orig, fake, mask, pad_width=32, dilation=48):
    """HD-Painter's src/utils.poisson_blend, step by step with numpy + OpenCV."""
    cfg = ((pad_width, pad_width), (pad_width, pad_width), (0, 0))
    fake_p = np.pad(fake, cfg, mode="reflect")
    orig_p = np.pad(orig, cfg, mode="reflect")
    orig_p[:pad_width] = fake_p[:pad_width]
    orig_p[:, :pad_width] = fake_p[:, :pad_width]
    orig_p[-pad_width:] = fake_p[-pad_width:]
    orig_p[:, -pad_width:] = fake_p[:, -pad_width:]
    mask_p = np.pad(mask, cfg[:2], mode="constant")
    dmask = cv2.dilate(mask_p, np.ones((dilation, dilation), np.uint8), iterations=1)
    x, y, w, h = cv2.boundingRect(dmask)
    out = cv2.seamlessClone(fake_p, orig_p, dmask, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
    return out[pad_width:-pad_width, pad_width:-pad_width]


@pytest.mark.parametrize("where", ["centre", "corner"])
def test_hd_painter_blend_matches_the_official_procedure(where):
    h, w = 160, 192
    orig, fake = picture(h, w, 9), picture(h, w, 10)
    small = np.zeros((h // 4, w // 4), np.uint8)
    if where == "centre":
        small[12:28, 15:35] = 255
    else:  # touching the image border: the reflect padding and border overwrite matter
        small[0:14, 30:48] = 255
    mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    ref = official_poisson_blend(orig, fake, mask)
    ours = hd_painter_blend(to_t(orig), to_t(fake), torch.from_numpy(mask)[None].double() / 255)
    assert_floor_equal(to_np(ours), ref)
    # outside the bounding box of the dilated mask (and on its ring) the original is untouched
    # (in the 32-px padded frame the official code works in)
    x, y, bw, bh = cv2.boundingRect(cv2.dilate(np.pad(mask, 32), np.ones((48, 48), np.uint8)))
    far = np.ones((h + 64, w + 64), bool)
    far[y + 1:y + bh - 1, x + 1:x + bw - 1] = False
    far = far[32:-32, 32:-32]
    assert far.any()
    assert np.array_equal(np.round(to_np(ours)[far]), orig[far].astype(float))


def test_dilate_box_matches_opencv_even_and_odd_kernels():
    rng = np.random.default_rng(0)
    m = (rng.random((70, 90)) > 0.995).astype(np.uint8) * 255
    for k in (2, 7, 48):
        ours = dilate_box(torch.from_numpy(m)[None].float(), k)[0].numpy()
        assert np.array_equal(ours, cv2.dilate(m, np.ones((k, k), np.uint8))), k


def test_blend_of_an_inner_hole_works_on_its_window_only_with_the_same_result():
    from asuka_core import poisson

    g = torch.Generator().manual_seed(3)
    orig, fake = torch.rand(2, 3, 200, 240, generator=g), torch.rand(2, 3, 200, 240, generator=g)
    mask = torch.zeros(2, 200, 240)
    mask[0, 60:90, 70:120] = 1
    mask[1, 100:130, 150:170] = torch.rand(30, 20, generator=g)
    window = poisson.blend_window(mask, 200, 240, 48)
    assert window == (60 - 23 - 1, 70 - 23 - 1, 130 + 24 + 1, 170 + 24 + 1)
    whole = poisson._blend_padded(orig, fake, mask, 32, 48)
    assert torch.equal(hd_painter_blend(orig, fake, mask), whole)
    near = torch.zeros(1, 200, 240)
    near[:, 10:40, 100:140] = 1                                  # the grown box reaches the border
    assert poisson.blend_window(near, 200, 240, 48) is None
    assert poisson.blend_window(torch.zeros(1, 200, 240), 200, 240, 48) is None


@pytest.mark.parametrize("size", [2, 7, 48])
def test_dilate_box_computes_only_near_the_mask_and_equals_the_whole_window_maximum(size):
    """The bounding-box shortcut against the plain formula over the whole picture, for holes
    in the middle, on every border and soft values."""
    g = torch.Generator().manual_seed(size)
    mask = torch.zeros(3, 90, 120)
    mask[0, 30:40, 50:61] = torch.rand(10, 11, generator=g)
    mask[1, 0:5, 0:3] = 1
    mask[1, 85:90, 110:120] = 0.5
    lo, hi = size // 2, size - 1 - size // 2
    whole = F.max_pool2d(F.pad(mask[:, None], (lo, hi, lo, hi), value=0.0), size, stride=1)[:, 0]
    assert torch.equal(dilate_box(mask, size), whole)
    assert torch.equal(dilate_box(torch.zeros(1, 20, 20), size), torch.zeros(1, 20, 20))


def test_errors_name_the_problem():
    img = torch.rand(1, 3, 40, 40)
    with pytest.raises(InputError, match="same size"):
        seamless_clone(img, torch.rand(1, 3, 40, 48), torch.ones(1, 40, 40))
    with pytest.raises(InputError, match="mask"):
        seamless_clone(img, img, torch.ones(1, 32, 40))
    with pytest.raises(InputError, match="padding"):
        hd_painter_blend(img, img, torch.ones(1, 40, 40), pad=64)


def test_image_level_blend_checks_sizes_and_keeps_comfy_layout():
    from asuka_core.poisson import blend_images

    original, generated = torch.rand(1, 64, 80, 3), torch.rand(1, 64, 80, 3)
    mask = torch.zeros(1, 64, 80)
    mask[:, 20:40, 30:50] = 1
    out = blend_images(original, generated, mask, pad=8, dilation=6)
    assert out.shape == (1, 64, 80, 3) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out[:, :5], original[:, :5])        # far above the grown mask's box
    with pytest.raises(InputError, match="generated image is 48x64 but the original is 80x64"):
        blend_images(original, torch.rand(1, 64, 48, 3), mask)
    with pytest.raises(InputError, match="mask is 80x60 but the image is 80x64"):
        blend_images(original, generated, torch.zeros(1, 60, 80))
