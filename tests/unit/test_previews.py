"""asuka_core.previews: the MAE's hidden patches and the hole's outline, against direct loops."""

from __future__ import annotations

import torch

from asuka_core import previews
from asuka_core.mae import patch_rules, preprocess


def test_overlay_tints_exactly_the_hidden_patches():
    image = torch.rand(1, 64, 96, 3)
    patch_mask = torch.zeros(1, 16, dtype=torch.bool)     # a 4x4 grid over a 64x96 picture
    patch_mask[0, [0, 5, 15]] = True
    out = previews.hidden_patch_overlay(image, patch_mask)
    tint = torch.tensor(previews.HIDDEN_TINT)
    for row in range(4):
        for col in range(4):
            cell = (slice(row * 16, (row + 1) * 16), slice(col * 24, (col + 1) * 24))
            got, src = out[0][cell], image[0][cell]
            if patch_mask[0, row * 4 + col]:
                want = src * (1 - previews.HIDDEN_STRENGTH) + tint * previews.HIDDEN_STRENGTH
                assert torch.allclose(got, want, atol=1e-6)
            else:
                assert torch.equal(got, src)


def test_overlay_uses_the_mae_patch_rule():
    """A hole that touches a patch by one pixel hides the patch (the official rule): the overlay
    of the real patch mask tints the patch that holds that pixel."""
    image = torch.rand(1, 256, 256, 3)
    mask = torch.zeros(1, 256, 256)
    mask[0, 20, 40] = 1.0                                  # patch row 1, col 2
    hole, _ = patch_rules(preprocess(image, mask)[1])
    out = previews.hidden_patch_overlay(image, hole)
    assert not torch.equal(out[0, 16:32, 32:48], image[0, 16:32, 32:48])
    out[0, 16:32, 32:48] = image[0, 16:32, 32:48]
    assert torch.equal(out, image)


def test_outline_is_the_band_around_the_edge():
    mask = torch.zeros(1, 40, 40)
    mask[0, 10:30, 12:28] = 1.0
    edge = previews.mask_outline(mask, width=2)[0]
    hole = mask[0] >= 0.5
    for y in range(40):
        for x in range(40):
            window = hole[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
            assert bool(edge[y, x]) == bool(window.any() and not window.all()), (y, x)
    layer = previews.outline_layer(mask)
    assert layer.shape == (1, 40, 40, 4)
    assert torch.equal(layer[0, ..., 3] > 0, edge)


def test_fit_only_shrinks():
    image = torch.rand(1, 300, 1200, 3)
    assert previews.fit(image, 600).shape == (1, 150, 600, 3)
    assert previews.fit(image, 2000) is image
