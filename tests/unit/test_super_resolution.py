"""asuka_core.super_resolution against independent re-derivations of HD-Painter's SR stage
(official ``src/methods/sr.py``, reference A.6):

* the blend mask, rebuilt with the official tools (scipy ``binary_dilation``, PIL bicubic
  resize, torchvision ``gaussian_blur``);
* the sampler, against the official DDIM loop written out in its own (variance-preserving,
  v-prediction) terms, with the model wrapped the way ComfyUI 0.3.75 wraps the x4 upscaler
  (its own ``SD_X4Upscaler`` config and ``model_sampling``), when a ComfyUI tree is available;
* tiling: exact for per-pixel functions, and cross-fading where tiles disagree.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from asuka_core.errors import InputError
from asuka_core.tiling import region_share
from asuka_core.super_resolution import (
    SR_CONTEXT, sr_regions,
    BLUR_KERNEL, DILATION, blend_mask, gaussian_blur, grow_mask_diamond, run_tiled, sample_known_latent_blend,
)


def official_blend_mask(mask_u8: np.ndarray, lr_hw: tuple[int, int]) -> torch.Tensor:
    """sr.py: hr_mask.dilate(19) (scipy, cross element, any non-zero), PIL bicubic resize of
    the 0/255 mask to the low-res size, /255, torchvision gaussian_blur(kernel_size=19)."""
    from scipy.ndimage import binary_dilation
    import torchvision.transforms.functional as TvF

    grown = (binary_dilation(mask_u8 > 0, iterations=DILATION) * 255).astype(np.uint8)
    small = np.array(Image.fromarray(grown).resize(lr_hw[::-1], resample=Image.BICUBIC))
    t = torch.from_numpy(small).float()[None, None] / 255
    return TvF.gaussian_blur(t, kernel_size=BLUR_KERNEL)


def soft_mask(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((h // 8, w // 8), np.uint8)
    m[h // 32: h // 14, w // 24: w // 10] = 255
    m[rng.random(m.shape) > 0.97] = 255
    # bicubic up (soft edges, as HD-Painter's 2048 mask)
    return np.array(Image.fromarray(m).resize((w, h), resample=Image.BICUBIC))


def test_diamond_growth_matches_scipy():
    from scipy.ndimage import binary_dilation

    m = soft_mask(64, 96, 1)
    ours = grow_mask_diamond(torch.from_numpy(m.copy())[None].float() / 255, 7)[0].numpy() > 0.5
    assert np.array_equal(ours, binary_dilation(m > 0, iterations=7))


@pytest.mark.parametrize("hw", [(256, 256), (192, 320)])
def test_blend_mask_matches_the_official_pipeline(hw):
    h, w = hw
    m = soft_mask(h, w, 2)
    ref = official_blend_mask(m, (h // 4, w // 4))
    ours = blend_mask(torch.from_numpy(m.copy())[None].float() / 255, (h // 4, w // 4))
    assert ours.shape == (1, 1, h // 4, w // 4)
    # PIL resizes in 8-bit fixed point and rounds to uint8: at most one grey level apart
    # before the blur (a weighted mean, which cannot widen the gap)
    assert (ours - ref).abs().max() <= 1 / 255 + 1e-6
    assert 0 < ours.min() < 0.5 < ours.max() <= 1


def test_gaussian_blur_matches_torchvision():
    import torchvision.transforms.functional as TvF

    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    for k in (3, 19):
        assert torch.allclose(gaussian_blur(x, k), TvF.gaussian_blur(x, kernel_size=k), atol=1e-6)


# ------------------------------------------------------------------------------ sampler


def fake_v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, non-linear stand-in for the CFG-combined x4 UNet v output."""
    t = t.reshape(-1, 1, 1, 1).to(z.dtype)
    return torch.tanh(0.8 * z + 0.3 * z.roll(1, dims=-1)) * (1 - t / 2000) + 0.05 * torch.sin(t / 37.0)


def official_sr_loop(z: torch.Tensor, known: torch.Tensor, mask: torch.Tensor, dt: int = 50,
                     blend_eps: bool = False) -> torch.Tensor:
    """sr.py's loop in float64: betas linear 1e-4..0.02 (squared linspace of the roots),
    t = 999, 949, ..., 49; eps and x0 from v; x0 blended; z_next with eps from the unblended
    output. Returns the last blended x0 (what the official code decodes)."""
    betas = torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    z = z.double()
    for t in range(999, 0, -dt):
        v = fake_v(z, torch.tensor([float(t)], dtype=torch.float64))
        eps = ab[t].sqrt() * v + (1 - ab[t]).sqrt() * z
        x0 = ab[t].sqrt() * z - (1 - ab[t]).sqrt() * v
        x0 = x0 * mask + known * (1 - mask)
        if blend_eps:  # the "approximate" variant: eps re-derived from the blended x0
            eps = (z - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        z = ab[t - dt].sqrt() * x0 + (1 - ab[t - dt]).sqrt() * eps
    return x0


@pytest.fixture(scope="module")
def comfy_x4_sampling():
    comfy_dir = os.environ.get("ASUKA_COMFY_DIR")
    if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "main.py")):
        pytest.skip("needs the ComfyUI tree (run with scripts/host.sh test)")
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_base
    import comfy.samplers
    import comfy.supported_models

    config = comfy.supported_models.SD_X4Upscaler({
        "context_dim": 1024, "model_channels": 256, "in_channels": 7, "use_linear_in_transformer": True,
        "adm_in_channels": None})
    ms = comfy.model_base.model_sampling(config, comfy.model_base.ModelType.V_PREDICTION)
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", 20)
    return ms, sigmas


def comfy_denoiser(ms):
    """What BaseModel._apply_model does around the UNet: input scaling, sigma -> timestep,
    V_PREDICTION's denoised."""
    def model(x, sigma, **_):
        xc = ms.calculate_input(sigma, x)
        v = fake_v(xc, ms.timestep(sigma).float())
        return ms.calculate_denoised(sigma, v, x)
    return model


def test_sampler_reproduces_the_official_sr_loop(comfy_x4_sampling):
    ms, sigmas = comfy_x4_sampling
    assert torch.allclose(ms.timestep(sigmas[:-1]).float(), torch.arange(999, 0, -50).float())
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 48, 64, generator=g)
    known = torch.randn(1, 4, 48, 64, generator=g) * 0.8
    hr_mask = torch.zeros(1, 192, 256)
    hr_mask[:, 16:64, 20:80] = 1
    mask = blend_mask(hr_mask, (48, 64))
    # ComfyUI starts from noise * sqrt(1 + sigma_max^2) (+ the empty latent): z_T = noise
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    steps = []
    ours = sample_known_latent_blend(comfy_denoiser(ms), x, sigmas, known=known, mask=mask,
                                     callback=lambda d: steps.append(d["i"]))
    ref = official_sr_loop(noise, known.double(), mask.double())
    assert steps == list(range(20))
    # float32 sigma table and latents vs the float64 loop, over 20 steps
    assert (ours.double() - ref).abs().max() < 1e-4
    # the known region is the known latent where the mask is 0
    keep = mask == 0
    assert keep.any() and torch.allclose(ours.expand_as(known)[keep.expand_as(known)],
                                         known[keep.expand_as(known)], atol=1e-6)
    # and the check can tell the variants apart: eps from the blended x0 gives another result
    other = official_sr_loop(noise, known.double(), mask.double(), blend_eps=True)
    assert (other - ref).abs().max() > 1e-2


def test_sampler_refuses_a_known_latent_of_another_size():
    x = torch.zeros(1, 4, 16, 16)
    with pytest.raises(InputError, match="4x"):
        sample_known_latent_blend(lambda x, s: x, x, torch.tensor([1.0, 0.0]),
                                  known=torch.zeros(1, 4, 8, 8), mask=torch.ones(1, 1, 8, 8))


# ------------------------------------------------------------------------------ tiles


def test_tiles_are_exact_for_pixelwise_functions():
    x = torch.randn(2, 4, 40, 56)
    c = torch.randn(2, 3, 40, 56)
    fn = lambda a, s: torch.tanh(a) * 2 + s["c"][:, :1]  # noqa: E731
    whole = fn(x, {"c": c})
    calls = []
    tiled = run_tiled(fn, x, {"c": c}, tile=16, overlap=4, on_tile=lambda: calls.append(1))
    assert len(calls) > 4
    assert torch.allclose(tiled, whole, atol=1e-6)


def test_tiles_cross_fade_where_they_disagree():
    """fn sees only its tile: returning the tile's mean makes every tile constant; the
    blend must then vary smoothly (no jump larger than the per-tile difference / ramp)."""
    x = torch.linspace(0, 1, 64).repeat(1, 1, 16, 1)
    out = run_tiled(lambda a, s: a.mean().expand_as(a), x, {}, tile=16, overlap=8)
    row = out[0, 0, 0]
    assert (row.diff() >= -1e-6).all()           # monotone, like the input
    assert row.diff().abs().max() < 0.05         # no seam


# ------------------------------------------------------------------------------ regions


def _two_hole_mask(batch_masks):
    """A blend mask [B, 1, 128, 192] from HR masks with the given pixel boxes per sample."""
    hr = torch.zeros(len(batch_masks), 512, 768)
    for b, boxes in enumerate(batch_masks):
        for y0, y1, x0, x1 in boxes:
            hr[b, y0:y1, x0:x1] = 1
    return blend_mask(hr, (128, 192))


def test_sr_regions_hold_every_cell_the_blend_can_change():
    mask = _two_hole_mask([[(0, 30, 0, 40)], [(450, 512, 700, 768)]])    # corners, one per sample
    boxes = sr_regions(mask, "hole")
    assert len(boxes) == 2
    covered = torch.zeros(128, 192, dtype=torch.bool)
    for b in boxes:
        covered[b.y:b.y + b.height, b.x:b.x + b.width] = True
    changed = (mask > 0).any(dim=0)[0]
    assert changed.any() and covered[changed].all()
    # context: SR_CONTEXT cells around every changed cell (inside the latent)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert covered[(ys + SR_CONTEXT).clamp(max=127), xs].all() and covered[ys, (xs - SR_CONTEXT).clamp(min=0)].all()
    assert sr_regions(mask, "full") is None
    assert sr_regions(mask, "auto") == boxes and region_share(boxes, 128, 192) <= 0.5
    big = _two_hole_mask([[(80, 440, 120, 660)]])
    assert sr_regions(big, "auto") is None and len(sr_regions(big, "hole")) == 1
    assert sr_regions(torch.zeros(1, 1, 128, 192), "hole") == []
    with pytest.raises(InputError, match="region"):
        sr_regions(mask, "box")


def _region_denoiser(denoise, boxes, known):
    """What the node's model wrapper does: the model on the boxes, the known latent elsewhere."""
    def model(x, sigma, **_):
        return run_tiled(lambda a, _s: denoise(a, sigma), x, {}, tile=None, overlap=0, boxes=boxes, fill=known)
    return model


@pytest.mark.parametrize("tile", [None, 12])
def test_region_sampling_equals_full_sampling_for_a_pixelwise_model(tile):
    """Outside the boxes the blend keeps the known latent whatever the model says, so a
    model that looks at each cell alone gives exactly the full result everywhere."""
    g = torch.Generator().manual_seed(1)
    mask = _two_hole_mask([[(0, 40, 0, 60), (470, 512, 700, 768)], [(20, 60, 30, 90)]])
    x = torch.randn(2, 4, 128, 192, generator=g) * 5
    known = torch.randn(2, 4, 128, 192, generator=g)
    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.0])
    pixelwise = lambda a, s: torch.tanh(a / (1 + s)) * 0.9  # noqa: E731
    full = sample_known_latent_blend(lambda a, s: pixelwise(a, s[0]), x, sigmas, known=known, mask=mask)
    boxes = sr_regions(mask, "hole")
    calls = []

    def counted(a, s):
        calls.append(tuple(a.shape[-2:]))
        return pixelwise(a, s[0])

    model = lambda a, s: run_tiled(lambda t, _c: counted(t, s), a, {}, tile=tile, overlap=4,  # noqa: E731
                                   boxes=boxes, fill=known)
    region = sample_known_latent_blend(model, x, sigmas, known=known, mask=mask)
    assert torch.allclose(region, full, atol=1e-6)
    assert sum(h * w for h, w in calls) < 3 * 128 * 192 * 0.9       # fewer cells than the full latent
    # a model with a global statistic sees only its region: the result then differs
    global_model = lambda a, s: a - a.mean()  # noqa: E731
    ref = sample_known_latent_blend(lambda a, s: global_model(a, s), x, sigmas, known=known, mask=mask)
    approx = sample_known_latent_blend(_region_denoiser(global_model, boxes, known), x, sigmas, known=known,
                                       mask=mask)
    keep = (mask == 0).expand_as(known)
    assert torch.equal(approx[keep], known[keep]) and not torch.allclose(approx, ref, atol=1e-4)
