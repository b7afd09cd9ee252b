"""Small plumbing shared by the three models: layer factories, device/dtype, progress.

``operations`` is a namespace with ``Linear``, ``Conv2d``, ``LayerNorm``, ``GroupNorm``
classes, as in ComfyUI's own model code. ``None`` means plain ``torch.nn``; the ComfyUI
nodes pass ``comfy.ops.manual_cast`` so weights stay in their storage dtype and are cast
per layer. Models never import ComfyUI themselves.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Progress = Optional[Callable[[int, int], None]]
"""Called as ``progress(done, total)`` after each unit of work. It may raise to cancel
(ComfyUI's progress bar raises when the user presses Cancel)."""


def resolve_ops(operations=None):
    return nn if operations is None else operations


def compute_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a model computes.

    The device is ``module.compute_device`` when set, else its first parameter's device;
    the dtype is ``module.compute_dtype`` when set (manual-cast layers), else its first
    parameter's dtype. ComfyUI's host sets ``compute_device`` to the ModelPatcher's
    ``load_device``: under partial loading (``--lowvram``/``--novram``) some weights stay
    on the offload device and are cast per layer, so no parameter tells where to compute.
    """
    p = next(module.parameters())
    device = getattr(module, "compute_device", None)
    dtype = getattr(module, "compute_dtype", None) or p.dtype
    return (torch.device(device) if device is not None else p.device), dtype


def report(progress: Progress, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def residual_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype of a transformer's residual stream for a compute dtype.

    float16 has a narrow range (max 65504): the stream, which grows through the blocks, is
    kept in float32 and only the layers compute in float16, as PyTorch's fp16 autocast
    (the MAE's training setting) does. bfloat16 and float32 keep the stream in their own
    dtype, as the official bfloat16 inference does.
    """
    return torch.float32 if compute == torch.float16 else compute


def layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a LayerNorm layer to ``x`` in ``x``'s dtype, whatever its weights' dtype.

    Cast layers (ComfyUI's ``manual_cast``, or any comfy layer while ComfyUI has set its
    ``comfy_cast_weights`` for partial loading) do that themselves and also apply ComfyUI's low-VRAM weight patches; a plain
    ``nn.LayerNorm`` refuses weights of another dtype, so it is applied functionally."""
    weight = module.weight
    if getattr(module, "comfy_cast_weights", False) or weight is None or weight.dtype == x.dtype:
        return module(x)
    bias = None if module.bias is None else module.bias.to(device=x.device, dtype=x.dtype)
    return F.layer_norm(x, module.normalized_shape, weight.to(device=x.device, dtype=x.dtype), bias, module.eps)
