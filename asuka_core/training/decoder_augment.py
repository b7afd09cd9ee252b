"""The two corruptions ASUKA's masked decoder is fine-tuned with (paper §3.3, §5).

* **Colour augmentation**: every training image is colour-jittered (brightness 0.15,
  contrast 0.2, saturation 0.1, hue 0.03, torchvision ``ColorJitter`` semantics: one
  factor per operation drawn uniformly, the four operations in a random order) *before
  it is encoded*; the decoder sees the jittered latent but the unjittered known pixels,
  and must reproduce the original picture. It thereby learns to take colours from the
  known region rather than from the latent.
* **Latent augmentation**: for half of the images the latent given to the decoder is
  the frozen SD inpainting UNet's one-step estimate of the clean latent (paper eq. 1)::

      z0_hat = (z_t - sqrt(1 - abar_t) * eps_theta([z_t; z0; M], t)) / sqrt(abar_t)

  with ``t`` uniform in [500, 1000), ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``, the
  clean latent ``z0`` as the masked-image latent and an all-zero mask ``M`` (nothing to
  fill: the UNet is told everything, so the estimate keeps the content and differs from
  ``z0`` only by the UNet's own distribution shift, the gap between generated and real
  latents). The paper precomputes it off-line; here it is computed on the fly with the
  frozen UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

# Paper §5: "ColorJitter ... brightness 0.15, contrast 0.2, saturation 0.1, and hue 0.03".
PAPER_JITTER = (0.15, 0.2, 0.1, 0.03)
# Paper §3.3: "the timestep t is randomly sampled from [500, 1000)".
PAPER_T_RANGE = (500, 1000)
OPERATIONS = ("brightness", "contrast", "saturation", "hue")
_GREY = (0.2989, 0.587, 0.114)   # ITU-R 601 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class Jitter:
    """One image's colour jitter: the order of the four operations (indices into
    ``OPERATIONS``) and their factors (hue: a shift in turns, the others multipliers)."""

    order: tuple[int, ...]
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0


def draw_jitter(rng: np.random.Generator, strength: Sequence[float] = PAPER_JITTER) -> Jitter:
    """Random jitter as ``ColorJitter(*strength)`` draws it: multipliers uniform in
    ``[max(0, 1 - s), 1 + s]``, hue shift uniform in ``[-h, h]``, a random order."""
    b, c, s, h = (float(x) for x in strength)
    order = tuple(int(i) for i in rng.permutation(4))
    factor = lambda v: float(rng.uniform(max(0.0, 1.0 - v), 1.0 + v)) if v > 0 else 1.0  # noqa: E731
    return Jitter(order, brightness=factor(b), contrast=factor(c), saturation=factor(s),
                  hue=float(rng.uniform(-h, h)) if h > 0 else 0.0)


def grey(rgb: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` -> ``[..., 1]`` luma."""
    w = torch.tensor(_GREY, dtype=rgb.dtype, device=rgb.device)
    return (rgb * w).sum(-1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * a + (1.0 - factor) * b).clamp(0.0, 1.0)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` RGB 0..1 -> HSV, hue in turns (0..1)."""
    r, g, b = rgb.unbind(-1)
    v, _ = rgb.max(-1)
    lo, _ = rgb.min(-1)
    span = v - lo
    grey_px = span <= 0
    safe = torch.where(grey_px, torch.ones_like(span), span)
    s = torch.where(v > 0, span / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    hue = torch.where(v == r, (g - b) / safe,
                      torch.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(grey_px, torch.zeros_like(hue), hue)
    return torch.stack([torch.remainder(hue / 6.0, 1.0), s, v], -1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(-1)
    k = lambda n: torch.remainder(n + h * 6.0, 6.0)  # noqa: E731
    # Standard piecewise-linear form: channel n = v - v s max(0, min(k, 4 - k, 1)).
    chan = lambda n: v - v * s * k(n).minimum(4.0 - k(n)).clamp(0.0, 1.0)  # noqa: E731
    return torch.stack([chan(5.0), chan(3.0), chan(1.0)], -1)


def apply_jitter(image: torch.Tensor, jitter: Jitter) -> torch.Tensor:
    """One IMAGE ``[H, W, 3]`` 0..1, jittered (torchvision's adjust_* operations)."""
    out = image
    for op in jitter.order:
        name = OPERATIONS[op]
        if name == "brightness":
            out = _blend(out, torch.zeros_like(out), jitter.brightness)
        elif name == "contrast":
            out = _blend(out, grey(out).mean(), jitter.contrast)
        elif name == "saturation":
            out = _blend(out, grey(out), jitter.saturation)
        elif jitter.hue != 0.0:
            hsv = rgb_to_hsv(out)
            hsv = torch.stack([torch.remainder(hsv[..., 0] + jitter.hue, 1.0), hsv[..., 1], hsv[..., 2]], -1)
            out = hsv_to_rgb(hsv)
    return out


def jitter_batch(images: torch.Tensor, jitters: Sequence[Jitter]) -> torch.Tensor:
    """IMAGE ``[B, H, W, 3]`` with one ``Jitter`` per image."""
    return torch.stack([apply_jitter(images[i], j) for i, j in enumerate(jitters)])


# ------------------------------------------------------------------------------ latent

def alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """DDPM ``abar_t`` from the k-diffusion sigma of the same step: ``sigma^2 = (1 - abar) / abar``."""
    return 1.0 / (1.0 + sigma.double() ** 2)


def one_step_x0(z_t: torch.Tensor, eps_hat: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Paper eq. (1): ``(z_t - sqrt(1 - abar) eps_hat) / sqrt(abar)`` (``abar`` per sample)."""
    a = abar.to(z_t.device).view(-1, *([1] * (z_t.ndim - 1)))
    return ((z_t.double() - (1.0 - a).sqrt() * eps_hat.double()) / a.sqrt()).to(z_t.dtype)


Denoiser = Callable[..., torch.Tensor]


@torch.no_grad()
def latent_augment(z0_raw: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *, denoiser: Denoiser,
                   sigmas: torch.Tensor, context: torch.Tensor,
                   latent_in: Callable[[torch.Tensor], torch.Tensor] = lambda z: z,
                   latent_out: Callable[[torch.Tensor], torch.Tensor] = lambda z: z) -> torch.Tensor:
    """The UNet's one-step estimate of ``z0_raw`` (raw VAE latents ``[B, 4, h, w]``) at
    discrete timesteps ``t`` ``[B]`` with Gaussian ``noise`` (model space), returned as raw
    latents. ``denoiser(x, sigma, context, masked_latent, mask) -> eps_hat`` is the frozen
    inpainting UNet in k-diffusion form (``x = z0 + sigma * eps``, ``x = z_t / sqrt(abar)``),
    as ``nodes/training_glue.make_denoiser`` builds it; ``context`` its cross-attention
    input (the empty prompt)."""
    z0 = latent_in(z0_raw).float()
    sigma = sigmas.to(z0.device, torch.float32)[t.to(z0.device)]
    abar = alpha_bar(sigma)
    z_t = abar.sqrt().view(-1, 1, 1, 1).float() * z0 + (1.0 - abar).sqrt().view(-1, 1, 1, 1).float() * noise
    x = z_t / abar.sqrt().view(-1, 1, 1, 1).float()             # = z0 + sigma * noise
    b, _, h, w = z0.shape
    no_hole = torch.zeros(b, h * 8, w * 8, device=z0.device)
    ctx = context.to(z0.device)
    if ctx.shape[0] != b:
        ctx = ctx.expand(b, *ctx.shape[1:])
    eps_hat = denoiser(x, sigma, ctx, z0_raw, no_hole).float()
    return latent_out(one_step_x0(z_t, eps_hat, abar))


def draw_timesteps(gen: torch.Generator, count: int, t_range: Sequence[int] = PAPER_T_RANGE) -> torch.Tensor:
    lo, hi = int(t_range[0]), int(t_range[1])
    return torch.randint(lo, hi, (count,), generator=gen)


def check_t_range(t_range: Sequence[int], steps: int) -> str | None:
    lo, hi = int(t_range[0]), int(t_range[1])
    if not 0 <= lo < hi <= steps:
        return f"latent-augmentation timesteps must satisfy 0 <= low < high <= {steps} (got [{lo}, {hi}))"
    return None


__all__ = ["Jitter", "PAPER_JITTER", "PAPER_T_RANGE", "alpha_bar", "apply_jitter", "draw_jitter",
           "draw_timesteps", "hsv_to_rgb", "jitter_batch", "latent_augment", "one_step_x0", "rgb_to_hsv"]
