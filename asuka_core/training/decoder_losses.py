"""Losses of the masked-decoder fine-tuning, after the Asymmetric VQGAN recipe (the
base ASUKA fine-tunes; reference §5.3): a reconstruction term (L1 + LPIPS, weights
given by the user) through a learned log-variance, and from a chosen step a hinge
patch-GAN whose generator term is weighted adaptively (ratio of the two terms' gradient
norms at the decoder's last layer, times ``disc_weight``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """The pix2pix / taming "NLayerDiscriminator": 4x4 convs, stride 2 for the first
    ``layers`` convs, BatchNorm and LeakyReLU(0.2) between, one logit per patch.
    Weights N(0, 0.02), BatchNorm scales N(1, 0.02) (the taming initialisation)."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3, seed: int = 0):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(width * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=gen) * 0.02)
                    m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def reconstruction_nll(decoded: torch.Tensor, target: torch.Tensor, logvar: torch.Tensor, *,
                       l1_weight: float, lpips_weight: float,
                       perceptual: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
                       ) -> tuple[torch.Tensor, dict]:
    """``mean(rec / exp(logvar) + logvar)`` with ``rec = l1_weight |x - x_hat| +
    lpips_weight LPIPS(x, x_hat)`` per pixel (LPIPS per image, broadcast). Images
    ``[B, 3, H, W]`` in -1..1. Returns the loss and its parts (floats) for the log."""
    rec = l1_weight * (decoded - target).abs()
    parts = {"l1": float(rec.detach().mean()) / l1_weight if l1_weight else float((decoded - target).abs().mean())}
    if lpips_weight and perceptual is not None:
        p = perceptual(decoded, target).view(-1, 1, 1, 1)
        rec = rec + lpips_weight * p
        parts["lpips"] = float(p.detach().mean())
    nll = (rec / torch.exp(logvar) + logvar).mean()
    parts["rec"] = float(rec.detach().mean())
    return nll, parts


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, *,
                    disc_weight: float, max_weight: float = 1e4,
                    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``disc_weight * ||d nll / d W|| / (||d g_loss / d W|| + 1e-4)`` at the decoder's last
    layer ``W``, clamped to [0, max_weight], detached (the taming / AVQ rule). ``reduce``
    (data-parallel training) turns each process's gradient into the global batch's."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if reduce is not None:
        g_nll, g_gan = reduce(g_nll), reduce(g_gan)
    w = g_nll.norm() / (g_gan.norm() + 1e-4)
    return (w.clamp(0.0, max_weight) * disc_weight).detach()


__all__ = ["PatchDiscriminator", "adaptive_weight", "hinge_d_loss", "reconstruction_nll"]
