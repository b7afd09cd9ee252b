"""Small pictures for the frontend: what the MAE prior sees, and the outline of the hole.

Tensors follow ComfyUI's conventions (IMAGE ``[B,H,W,3]`` 0..1, MASK ``[B,H,W]`` 1 = hole).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HIDDEN_TINT = (1.0, 0.25, 0.65)   # pink, as the example thumbnails show the hole
HIDDEN_STRENGTH = 0.7
OUTLINE_COLOUR = (1.0, 0.85, 0.0)  # yellow


def fit(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """IMAGE-like ``[B,H,W,C]`` shrunk (antialiased) so that its longer side is at most ``max_side``."""
    height, width = image.shape[1:3]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    out = F.interpolate(image.movedim(-1, 1).float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.movedim(1, -1).clamp(0, 1)


def hidden_patch_overlay(image: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """The picture with the patches the MAE does not look at tinted: ``patch_mask`` is
    ``[B, N]`` bool in row-major order of a square grid (True = hidden patch), mapped onto
    the picture as the MAE's 256x256 view is (the whole picture squashed to a square)."""
    batch, height, width = image.shape[:3]
    grid = math.isqrt(patch_mask.shape[1])
    if grid * grid != patch_mask.shape[1]:
        raise ValueError(f"patch_mask has {patch_mask.shape[1]} patches, not a square grid")
    hidden = patch_mask.reshape(-1, 1, grid, grid).float()
    hidden = F.interpolate(hidden, size=(height, width), mode="nearest").reshape(-1, height, width, 1)
    if hidden.shape[0] == 1 and batch > 1:
        hidden = hidden.expand(batch, -1, -1, -1)
    tint = torch.tensor(HIDDEN_TINT, dtype=image.dtype, device=image.device)
    hidden = hidden.to(image.device, image.dtype) * HIDDEN_STRENGTH
    return image * (1 - hidden) + tint * hidden


def mask_outline(mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Bool ``[B,H,W]``: the pixels within ``width`` of the hole's edge, inside and outside
    (hole = mask >= 0.5)."""
    hole = (mask >= 0.5).float().unsqueeze(1)
    k = 2 * width + 1
    grown = F.max_pool2d(hole, k, stride=1, padding=width)
    shrunk = -F.max_pool2d(-hole, k, stride=1, padding=width)
    return (grown > shrunk).squeeze(1)


def outline_layer(mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """``[B,H,W,4]`` RGBA 0..1: the outline of the hole in OUTLINE_COLOUR, transparent elsewhere,
    to lay over a picture of the same size."""
    edge = mask_outline(mask, width).unsqueeze(-1).float()
    colour = torch.tensor(OUTLINE_COLOUR, dtype=torch.float32, device=mask.device)
    return torch.cat([colour.expand(*edge.shape[:3], 3) * edge, edge], dim=-1)
