"""Mask generator: reproducibility, hole-ratio bounds, family mix, drawing geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asuka_core.errors import InputError
from asuka_core.masks import EVALUATION_SHARES, MaskGenerator, draw_polyline, load_mask_folder


def test_masks_depend_only_on_seed_and_index():
    a = MaskGenerator(128, seed=3)
    b = MaskGenerator(128, seed=3)
    forward = [a(i) for i in range(12)]
    backward = [b(i) for i in reversed(range(12))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x, y)
    assert not torch.equal(MaskGenerator(128, seed=4)(0), forward[0])
    assert forward[0].dtype == torch.float32 and forward[0].shape == (128, 128)
    assert set(torch.unique(forward[0]).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("size", [(96, 160), (256, 256)])
def test_hole_ratio_stays_in_range(size):
    gen = MaskGenerator(size, seed=1, hole_ratio=(0.1, 0.75))
    ratios = np.array([gen.numpy(i).mean() for i in range(60)])
    assert ratios.min() >= 0.1 and ratios.max() <= 0.75
    assert ratios.std() > 0.05  # a spread of sizes, not one fixed mask


def test_family_shares_follow_the_paper_mix():
    gen = MaskGenerator(64, seed=0)
    n = 2000
    families = [gen.family(i) for i in range(n)]
    for name, share in {"object": 0.5, "irregular": 0.4, "box": 0.1}.items():
        observed = families.count(name) / n
        sigma = math.sqrt(share * (1 - share) / n)
        assert abs(observed - share) < 4 * sigma, (name, observed)
    eval_gen = MaskGenerator(64, seed=0, shares=EVALUATION_SHARES)
    assert "box" not in {eval_gen.family(i) for i in range(300)}


def _polyline_reference(h, w, points, width):
    """Independent rasterisation: distance to densely sampled points along each segment."""
    ys, xs = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), dtype=bool)
    for p, q in zip(points[:-1], points[1:]):
        t = np.linspace(0, 1, 2000)[:, None]
        samples = p[None] * (1 - t) + q[None] * t
        d2 = (xs[..., None] - samples[:, 0]) ** 2 + (ys[..., None] - samples[:, 1]) ** 2
        out |= d2.min(-1) <= (width / 2) ** 2
    return out


def test_polyline_matches_an_independent_rasterisation():
    points = np.array([(5.0, 7.0), (50.0, 30.0), (20.0, 55.0), (20.5, 55.2)])
    canvas = np.zeros((64, 64), dtype=bool)
    draw_polyline(canvas, points, 9.0)
    ref = _polyline_reference(64, 64, points, 9.0)
    iou = (canvas & ref).sum() / (canvas | ref).sum()
    assert iou > 0.98
    assert canvas.sum() > 0


def test_object_masks_from_a_folder(tmp_path):
    from PIL import Image

    disk = np.zeros((40, 60), dtype=np.uint8)
    yy, xx = np.mgrid[0:40, 0:60]
    disk[((yy - 20) / 18.0) ** 2 + ((xx - 30) / 25.0) ** 2 <= 1] = 255
    Image.fromarray(disk).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")  # skipped
    shapes = load_mask_folder(str(tmp_path))
    assert len(shapes) == 1 and shapes[0].shape == (37, 51)  # cropped to the object

    gen = MaskGenerator(128, seed=0, shares={"object": 1.0}, object_masks=str(tmp_path))
    assert gen.object_source == "1 object masks"
    for i in range(10):
        m = gen.numpy(i)
        assert 0.1 <= m.mean() <= 0.75


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(InputError, match="No usable mask images"):
        load_mask_folder(str(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        load_mask_folder(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="Unknown mask families"):
        MaskGenerator(64, shares={"blob": 1})
    with pytest.raises(InputError, match="hole_ratio"):
        MaskGenerator(64, hole_ratio=(0.8, 0.2))
    with pytest.raises(InputError, match="at least 16"):
        MaskGenerator(8)
