"""Backward passes through ComfyUI's loaded models (RASG and aligner training).

Both need gradients through a frozen UNet that ComfyUI caches for every later prompt, so
they must leave it exactly as they found it:

* ``differentiable_unet`` gives a UNet frozen copies of its inference-mode weights for
  the duration of one ``with`` block (``asuka_core.scoped_weights``) and puts its own
  tensors back afterwards; the ModelPatcher's patches, backups and ``model_options`` are
  never touched.
* ``grad_attention`` is an ``optimized_attention_override``: only attention backends known
  to have a backward pass run under it; any other (sage, sage3, flash, int8 and whatever a
  later ComfyUI adds) is replaced by PyTorch's SDPA for that call.
* ``saved_cast_buffers_copied``: a weight that ComfyUI casts into one of its reused
  per-stream cast buffers (partial loading, ComfyUI 0.33+) is saved for the backward pass
  as a copy, not as a view the next layer's weight overwrites.
* ``refuse_streamed_weights`` stops before a pass whose weights the host streams through
  shared buffers (DynamicVRAM): a tensor autograd saved there could be overwritten by the
  next layer's weights before the backward pass reads it.
"""

from __future__ import annotations

import contextlib

import torch
import comfy.model_management as mm
from comfy.ldm.modules import attention as comfy_attention

from ..asuka_core.errors import GradientError, ModelStateError
from ..asuka_core.scoped_weights import differentiable_weights

# Attention kernels whose backward pass is PyTorch autograd itself (plain maths, SDPA) or
# a documented backward (xformers' memory-efficient attention).
AUTOGRAD_ATTENTION = frozenset({"attention_basic", "attention_pytorch", "attention_xformers"})


def grad_attention(func, *args, **kwargs):
    """``optimized_attention_override`` for passes that need gradients (chain it last)."""
    if getattr(func, "__name__", "") in AUTOGRAD_ATTENTION:
        return func(*args, **kwargs)
    return comfy_attention.attention_pytorch(*args, **kwargs)


def chain_attention_override(transformer_options: dict) -> dict:
    """A copy of ``transformer_options`` whose attention override is ``grad_attention``,
    after any override already there (another pack's patch keeps working; the kernel it
    finally calls is one with a backward pass)."""
    options = dict(transformer_options or {})
    previous = options.get("optimized_attention_override")
    if previous is None:
        options["optimized_attention_override"] = grad_attention
    else:
        def chained(func, *args, **kwargs):
            def safe(*a, **kw):
                return grad_attention(func, *a, **kw)
            safe.__name__ = getattr(func, "__name__", "attention")
            out = previous(safe, *args, **kwargs)
            if _lost_gradient(args[:3], out):
                raise GradientError(
                    "A backward pass through the model is needed here, but another node's attention patch on it "
                    f"({getattr(previous, '__qualname__', previous)!r}) runs an attention kernel without autograd, "
                    "so the result would be wrong. Remove that patch from the model that goes into this node.")
            return out
        options["optimized_attention_override"] = chained
    return options


def _lost_gradient(inputs, out) -> bool:
    """True when an attention call's q, k or v needed a gradient and its output has none."""
    return (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and not out.requires_grad
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs))


def _cast_buffer_storages() -> set[int]:
    buffers = getattr(mm, "STREAM_CAST_BUFFERS", None) or {}
    return {b.untyped_storage().data_ptr() for b in list(buffers.values()) if isinstance(b, torch.Tensor)}


def _pack_saved(tensor: torch.Tensor):
    if not tensor.requires_grad and tensor.untyped_storage().data_ptr() in _cast_buffer_storages():
        return tensor.clone()
    # detached: a saved output that held itself would keep its autograd graph alive in a
    # reference cycle that Python's garbage collector cannot see
    return tensor.detach()


def _unpack_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def saved_cast_buffers_copied():
    """Within the block, a tensor autograd saves that lives in one of ComfyUI's reused
    cast buffers (where partly loaded weights are cast layer by layer) is saved as a
    copy. Saved as it is, the next layer's weight would overwrite it before the backward
    pass reads it. Costs nothing on hosts without such buffers (ComfyUI 0.3.x) or when
    the model is fully loaded."""
    with torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved):
        yield


def _streams_weights(model_patcher) -> bool:
    is_dynamic = getattr(model_patcher, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        return True
    unet = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    return unet is not None and any(hasattr(m, "_v") for m in unet.modules())      # DynamicVRAM's vbar


def refuse_streamed_weights(model_patcher, where: str) -> None:
    """ModelStateError when ComfyUI's DynamicVRAM holds this model (weights streamed on
    demand, not resident)."""
    if model_patcher is not None and _streams_weights(model_patcher):
        raise ModelStateError(
            f"{where}: this model is loaded with DynamicVRAM (ComfyUI's default on NVIDIA GPUs), which streams "
            "its weights through shared buffers; a backward pass needs them to stay put until it has run. "
            "Restart ComfyUI with --disable-dynamic-vram to use this node.")


@contextlib.contextmanager
def differentiable_unet(unet: torch.nn.Module, device: torch.device | None = None):
    """Within the block, autograd can run through ``unet`` (a loaded model's
    ``diffusion_model``; see ``asuka_core.scoped_weights``); on exit it holds its own
    tensors again."""
    with differentiable_weights(unet, device) as replaced:
        yield replaced
