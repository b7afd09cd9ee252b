"""HD-Painter's inpainting-specialised x4 super-resolution (official ``src/methods/sr.py``).

The SD x4 upscaler is run from pure noise on the upscaled inpainting, and at every step
its x0 prediction is replaced, outside a soft mask, by the latent of the high-resolution
original (the "known latent"), so the untouched part of the picture keeps its real
detail while the filled part is generated at high resolution.

What is reproduced, step by step (numbers from the official code):

* blend mask (``blend_mask``): the high-resolution mask, any non-zero pixel counting,
  grown by 19 iterations of a cross-shaped binary dilation (a diamond of L1 radius 19 px),
  resized to the latent size (bicubic with antialiasing, as PIL does), then blurred by a
  19-tap Gaussian (sigma 3.2, reflect padding, as torchvision's default).
* sampler step (``sample_known_latent_blend``), in ComfyUI's variance-exploding units where
  the model returns the denoised prediction D:  eps = (x - D) / sigma;
  D_b = m * D + (1 - m) * X0;  x_next = D_b + sigma_next * eps. This is exactly the official
  ``z_next = sqrt(ab') x0_b + sqrt(1 - ab') eps`` with eps from the *unblended* output; the
  last step (sigma_next = 0) returns the blended D.
* tiles (``run_tiled``): for outputs too large for memory, the model is evaluated on
  overlapping latent tiles whose outputs are cross-faded with the feather weights of
  ``asuka_core.tiling``. This is an approximation (each tile sees only its window); the
  official code has no tiling.

* regions (``sr_regions``): only the boxes around the part of the blend mask that is not
  zero, grown by ``SR_CONTEXT`` latent cells, are given to the UNet; outside them the
  blend returns the known latent whatever the model predicts, so the model's output
  there is replaced by the known latent without running it. The UNet's attention and
  normalisation then see the region only (an approximation, like tiles).

Not reproduced: the official code pads the high-resolution image and mask to a multiple of
256 (and the low-resolution image to 64) with reflection; here the sizes must already
agree (HR = 4 x LR), which a 512-stage result from an SD VAE does.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .errors import InputError
from .tiling import Tile, feather, hole_regions, region_share, tile_grid

DILATION = 19          # cross-shaped dilation iterations on the HR mask
BLUR_KERNEL = 19       # Gaussian blur taps on the latent-size mask
NOISE_LEVEL = 20       # official low-res noise augmentation level (out of 350)
NOISE_AUGMENTATION = NOISE_LEVEL / 350  # SD_4XUpscale_Conditioning's noise_augmentation
STEPS = 20             # official: t = 999, 949, ..., 49 (ComfyUI's "simple" schedule)
CFG = 7.5
POSITIVE_SUFFIX = "high resolution professional photo"
SCALE = 4              # the x4 upscaler's VAE downscale = the upscale factor
SR_CONTEXT = 16        # latent cells (64 output px) of context around the sampled region
REGION_AUTO_MAX_SHARE = 0.5  # "auto" samples the region only when it is at most half the latent


def grow_mask_diamond(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """Binary dilation of ``mask > 0`` ([B, H, W]) by ``iterations`` steps of the cross
    (4-neighbour) element, zero outside the image: scipy's ``binary_dilation`` default."""
    m = (mask > 0).float()
    if iterations <= 0:
        return m
    x = m[:, None]
    for _ in range(iterations):
        p = F.pad(x, (1, 1, 1, 1), value=0.0)
        x = torch.maximum(torch.maximum(torch.maximum(p[..., 1:-1, 1:-1], p[..., :-2, 1:-1]),
                                        torch.maximum(p[..., 2:, 1:-1], p[..., 1:-1, :-2])),
                          p[..., 1:-1, 2:])
    return x[:, 0]


def gaussian_kernel1d(size: int, sigma: float | None = None) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` kernel: default sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8."""
    if sigma is None:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.linspace(-(size - 1) * 0.5, (size - 1) * 0.5, size, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with reflect padding (torchvision's behaviour)."""
    if size <= 1:
        return x
    if size % 2 == 0:
        raise InputError(f"blur size {size} must be odd (like the official 19).")
    k = gaussian_kernel1d(size).to(x.device, x.dtype)
    c = x.shape[1]
    pad = size // 2
    if min(x.shape[-2:]) <= pad:
        raise InputError(f"the latent ({x.shape[-1]}x{x.shape[-2]}) is too small for a blur of {size} taps.")
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, size, 1), groups=c)


def blend_mask(mask: torch.Tensor, size: tuple[int, int], *, dilation: int = DILATION,
               blur: int = BLUR_KERNEL) -> torch.Tensor:
    """The official soft blend mask at latent size ``(h, w)``: [B, H, W] -> [B, 1, h, w] in 0..1,
    1 = generate, 0 = keep the known latent."""
    grown = grow_mask_diamond(mask, dilation)[:, None]
    small = F.interpolate(grown, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return gaussian_blur(small, blur).clamp(0, 1)


def check_sizes(image_hw: tuple[int, int], latent_hw: tuple[int, int], what: str = "image") -> None:
    """The high-resolution ``what`` must be exactly SCALE x the latent (= the low-res picture)."""
    (h, w), (lh, lw) = image_hw, latent_hw
    if (h, w) != (lh * SCALE, lw * SCALE):
        raise InputError(
            f"the high-resolution {what} is {w}x{h} but the upscaler works on {lw * SCALE}x{lh * SCALE} "
            f"(4 x the {lw}x{lh} low-resolution picture given to SD 4X Upscale Conditioning): give "
            f"the original picture and its mask at exactly 4x the size of the inpainted picture "
            f"(e.g. inpaint at 512, upscale the original to 2048).")


def _match_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise InputError(f"{t.shape[0]} {what} for a batch of {batch} latents: give one, or one per latent.")


def sample_known_latent_blend(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None,
                              callback=None, disable=None, *, known: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
    """k-diffusion-style sampler (the signature ComfyUI's KSAMPLER calls).

    model(x, sigma * ones(B), **extra_args) returns the (CFG-combined) denoised latent.
    known: [B or 1, C, h, w] the known latent in the model's latent space (scaled);
    mask: [B or 1, 1, h, w] soft, 1 = generate.
    """
    extra_args = {} if extra_args is None else extra_args
    if known.shape[-2:] != x.shape[-2:]:
        check_sizes((known.shape[-2] * SCALE, known.shape[-1] * SCALE), tuple(x.shape[-2:]))
    if known.shape[1] != x.shape[1]:
        raise InputError(f"the known latent has {known.shape[1]} channels but the sampled one {x.shape[1]}: "
                         "use the x4 upscaler's own VAE.")
    known = _match_batch(known, x.shape[0], "known latents").to(x.device, x.dtype)
    mask = _match_batch(mask, x.shape[0], "masks").to(x.device, x.dtype)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        eps = (x - denoised) / sigma
        blended = torch.lerp(known, denoised, mask)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": blended})
        x = blended + eps * sigma_next if sigma_next > 0 else blended
    return x


def sr_regions(mask: torch.Tensor, region: str, context: int = SR_CONTEXT) -> list[Tile] | None:
    """Latent boxes to sample for a blend mask ``[B, 1, h, w]`` (any sample's non-zero cells,
    grown by ``context``), or None for the whole latent. ``region``: "full" -> None; "hole"
    -> the boxes (none when the mask is empty); "auto" -> the boxes when they cover at most
    ``REGION_AUTO_MAX_SHARE`` of the latent, else None."""
    if region not in ("auto", "full", "hole"):
        raise InputError(f"region must be auto, full or hole; got {region!r}.")
    if region == "full":
        return None
    h, w = mask.shape[-2:]
    boxes = hole_regions((mask > 0).reshape(-1, h, w).any(dim=0), context)
    if region == "auto" and region_share(boxes, h, w) > REGION_AUTO_MAX_SHARE:
        return None
    return boxes


def run_tiled(fn: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor], x: torch.Tensor,
              spatial: Mapping[str, torch.Tensor], *, tile: int | None, overlap: int,
              on_tile: Callable[[], None] | None = None, boxes: list[Tile] | None = None,
              fill: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluate ``fn(x_tile, spatial_tiles)`` on overlapping tiles of ``x`` [B, C, h, w] and
    cross-fade the outputs. ``spatial`` tensors share x's last two dims and are cropped with
    it. ``tile``/``overlap`` in latent cells (``tile`` None: no tiling); one call when the
    latent fits in a tile. With ``boxes``, only those (disjoint) boxes are evaluated, each
    tiled like a whole latent, and ``fill`` (broadcastable to the output) is returned
    everywhere else."""
    if boxes is not None:
        out = fill.expand(*x.shape[:1], *fill.shape[1:]).to(x.device, x.dtype, copy=True)
        for b in boxes:
            ys, xs = slice(b.y, b.y + b.height), slice(b.x, b.x + b.width)
            crops = {k: v[..., ys, xs] for k, v in spatial.items()}
            out[..., ys, xs] = run_tiled(fn, x[..., ys, xs], crops, tile=tile, overlap=overlap, on_tile=on_tile)
        return out
    grid = tile_grid(x.shape[-2], x.shape[-1], tile, overlap)
    if grid.whole:
        return fn(x, spatial)
    out = None
    total = torch.zeros(x.shape[-2], x.shape[-1], device=x.device, dtype=torch.float32)
    for t in grid.tiles:
        ys, xs = slice(t.y, t.y + t.height), slice(t.x, t.x + t.width)
        crops = {k: v[..., ys, xs] for k, v in spatial.items()}
        y = fn(x[..., ys, xs], crops)
        if out is None:
            out = torch.zeros(*y.shape[:-2], x.shape[-2], x.shape[-1], device=x.device, dtype=torch.float32)
        w = feather(t, grid, 1).to(x.device)
        out[..., ys, xs] += y.float() * w
        total[ys, xs] += w
        if on_tile is not None:
            on_tile()
    return (out / total).to(x.dtype)
