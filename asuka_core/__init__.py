"""ASUKA in pure PyTorch: the MAE prior encoder, the aligner and the masked decoder.

Nothing here imports ComfyUI, so the same maths runs in scripts::

    from asuka_core import load_mae, load_aligner, load_decoder
    prior = load_mae("mae_300.pth").encode(image, mask)        # IMAGE [B,H,W,3], MASK [B,H,W]
    tokens = load_aligner("asuka_sd15_aligner.safetensors")(prior.features)
    pixels = load_decoder("decoder.safetensors").decode(latent, image, mask)

Tensor conventions are ComfyUI's (see ``asuka_core.imaging``).
"""

from __future__ import annotations

from .errors import AsukaError, CheckpointError, InputError

_LAZY = {
    "load_mae": ".mae", "MAE": ".mae", "MAEPrior": ".mae",
    "load_aligner": ".aligner", "Aligner": ".aligner",
    "load_decoder": ".decoder", "MaskedDecoder": ".decoder",
}

__all__ = ["AsukaError", "CheckpointError", "InputError", *_LAZY]


def __getattr__(name):  # imported on first use, so a script that only needs one model loads one module
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
