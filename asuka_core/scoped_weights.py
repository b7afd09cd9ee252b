"""Gradients through a model that its host loaded in inference mode, without changing it.

ComfyUI (like any host that loads under ``torch.inference_mode()``) holds weights that
are inference tensors: autograd cannot save them for a backward pass, even with the
mode switched off. RASG needs the gradient with respect to the UNet's input and aligner
training the gradient with respect to its text context; both need the weights saved.

``differentiable_weights`` gives a module ordinary frozen copies of those tensors for the
duration of a ``with`` block and puts the module's own tensors back on exit (also on an
error or an interrupt): afterwards the module holds the same Parameter and buffer objects,
with the same flags and values, and the copies are freed with the autograd graph that
used them. While the block runs the copies cost the memory of the copied weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def differentiable_weights(module: torch.nn.Module, device: torch.device | None = None) -> Iterator[int]:
    """Within the block, every inference-mode parameter and buffer of ``module`` (only
    those on ``device``, when given: weights elsewhere are copied to the compute device
    per call by the host anyway) is replaced by a copy autograd can save
    (``requires_grad=False``; a tied tensor gets one copy). Ordinary parameters that
    require a gradient are frozen for the block (the model is frozen: gradients go to its
    inputs only) and get their flag back on exit. Yields how many tensors were replaced.
    """
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    copies: dict[int, torch.Tensor] = {}
    frozen: list[torch.nn.Parameter] = []
    try:
        with torch.inference_mode(False):
            for owner in module.modules():
                for store in (owner._parameters, owner._buffers):
                    for name, tensor in list(store.items()):
                        if tensor is None:
                            continue
                        if not tensor.is_inference():
                            if tensor.requires_grad and tensor.is_leaf and all(tensor is not f for f in frozen):
                                tensor.requires_grad_(False)
                                frozen.append(tensor)
                            continue
                        if device is not None and tensor.device != torch.device(device):
                            continue
                        copy = copies.get(id(tensor))
                        if copy is None:
                            copy = tensor.detach().clone()
                            if isinstance(tensor, torch.nn.Parameter):
                                copy = torch.nn.Parameter(copy, requires_grad=False)
                            copies[id(tensor)] = copy
                        store[name] = copy
                        swapped.append((store, name, tensor))
        yield len(swapped)
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor
        for tensor in frozen:
            tensor.requires_grad_(True)
        copies.clear()

