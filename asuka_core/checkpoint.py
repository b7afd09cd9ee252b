"""Reading model files safely, and telling what a state dict is.

Loading never executes code from a file:

* ``.safetensors`` is read with ``safetensors``;
* pickled PyTorch files (``.pth`` ``.pt`` ``.ckpt`` ``.bin``) are read with
  ``torch.load(weights_only=True)``. Released training checkpoints also pickle
  bookkeeping objects (an ``argparse.Namespace`` of training arguments, Lightning or
  OmegaConf hyper-parameters). Those classes are not imported: each is replaced by an
  inert stand-in that only records the arguments it was given, so nothing from the file
  runs. A file that references anything outside that list of bookkeeping modules (for
  example ``os.system``) is refused before unpickling starts.

``identify`` names the kind of model a state dict holds, so that every loader can say
"this is an SD1.5 checkpoint, not an MAE" instead of failing on a missing key.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from .errors import CheckpointError

PICKLE_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
MODEL_EXTENSIONS = PICKLE_EXTENSIONS + SAFETENSORS_EXTENSIONS

# Top-level modules whose classes may appear as bookkeeping inside released training
# checkpoints. They are never imported; see _inert_stand_in.
_BOOKKEEPING_MODULES = frozenset({
    "argparse", "omegaconf", "pytorch_lightning", "lightning", "lightning_fabric",
    "numpy", "pathlib", "collections", "typing", "enum", "datetime", "functools",
    "torch", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
})


@dataclass
class Checkpoint:
    """A state dict (name -> tensor) with the file's metadata and where it came from."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def name(self) -> str:
        return os.path.basename(self.path) or "<state dict>"


class _Inert:
    """Stand-in for a bookkeeping class named in a pickle: stores what it is given, runs nothing."""

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        self._state = state


def _inert_stand_in(qualified_name: str):
    module, _, name = qualified_name.rpartition(".")
    return type(name or "Unknown", (_Inert,), {"__module__": module or "unknown"})


def _allowed_bookkeeping(qualified_name: str) -> bool:
    root = qualified_name.split(".", 1)[0]
    return root in _BOOKKEEPING_MODULES or qualified_name in _BOOKKEEPING_MODULES


def _torch_load_weights_only(path: str):
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError) as e:
        unsafe = None
        scan_error = e
    if unsafe is None:
        # Legacy (non-zip) pickles cannot be scanned up front; weights_only still refuses
        # anything that is not plain tensor data.
        if not _is_legacy_torch_file(path):
            raise CheckpointError(
                f"'{os.path.basename(path)}' is damaged or not a PyTorch file ({scan_error}). "
                "Download it again and check its size against the source."
            )
        unsafe = []
    refused = [g for g in unsafe if not _allowed_bookkeeping(g)]
    if refused:
        raise CheckpointError(
            f"Refusing to load '{os.path.basename(path)}': loading it would call "
            f"{', '.join(sorted(refused))}, which a checkpoint has no reason to do. Nothing from "
            "the file was run. Get the file from its official source, or a .safetensors version of it."
        )
    stand_ins = [(_inert_stand_in(g), g) for g in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=not _is_legacy_torch_file(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refusing to load '{os.path.basename(path)}': it is not plain tensor data ({_first_line(e)}). "
            "Nothing from the file was run. Use a .safetensors version of the file."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"'{os.path.basename(path)}' could not be read ({_first_line(e)}): the file is probably "
            "truncated or damaged. Download it again."
        ) from None


def _is_legacy_torch_file(path: str) -> bool:
    return not zipfile.is_zipfile(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"'{os.path.basename(path)}' is not a readable .safetensors file ({_first_line(e)}): "
            "it is probably truncated or damaged. Download it again."
        ) from None


def _flatten_tensors(obj) -> dict[str, torch.Tensor] | None:
    """Return obj as a name -> tensor dict when it is one (ignoring non-tensor entries)."""
    if not isinstance(obj, Mapping):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors or None


# Wrapper keys used by training frameworks around the actual weights, most specific first.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "ema", "params")


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Find the weights inside what a training framework saved.

    Accepts a plain state dict, ``{'model': sd}`` (MAE), ``{'state_dict': sd}``
    (Lightning) and DataParallel ``module.`` prefixes.
    """
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            found = _flatten_tensors(inner)
            if found and len(found) >= 2:
                return _strip_prefix(found, "module.")
    found = _flatten_tensors(obj)
    if found:
        return _strip_prefix(found, "module.")
    raise CheckpointError("The file holds no model weights (no tensors found). Is it a model file?")


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a model file without executing anything in it.

    ``path`` may also be a diffusers model folder (``config.json`` beside
    ``diffusion_pytorch_model.safetensors``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                     "diffusion_pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return read_checkpoint(os.path.join(path, name))
        raise CheckpointError(f"The folder '{path}' holds no diffusers weights file.")
    if not os.path.isfile(path):
        raise CheckpointError(f"Model file not found: '{path}'.")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_EXTENSIONS):
        tensors, metadata = _read_safetensors(path)
    elif lower.endswith(PICKLE_EXTENSIONS):
        tensors, metadata = unwrap_state_dict(_torch_load_weights_only(path)), {}
    else:
        raise CheckpointError(
            f"'{os.path.basename(path)}' has an unknown extension; use one of {', '.join(MODEL_EXTENSIONS)}."
        )
    if not tensors:
        raise CheckpointError(f"'{os.path.basename(path)}' holds no tensors.")
    return Checkpoint(tensors=tensors, metadata=metadata, path=path)


def as_checkpoint(source) -> Checkpoint:
    """Accept a path, a Checkpoint, or an in-memory state dict."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return Checkpoint(tensors=unwrap_state_dict(source))
    return read_checkpoint(source)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.fspath(path),
              metadata=dict(metadata or {}))


# --------------------------------------------------------------------------------------
# What is this state dict?


def _has(keys: Iterable[str], *names: str) -> bool:
    keys = set(keys)
    return all(n in keys for n in names)


def _any_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def identify(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short human description of the model a state dict holds (for error messages
    and for choosing an architecture). Returns one of the ``KIND_*`` strings."""
    keys = list(tensors)
    if _has(keys, "patch_embed.proj.weight", "decoder_embed.weight", "pos_embed"):
        return KIND_MAE
    if _has(keys, "0.weight", "1.linear1.weight", "5.weight"):
        return KIND_ALIGNER
    cond0 = tensors.get("decoder.encoder.layers.0.weight")
    if cond0 is not None and _any_prefix(keys, "decoder.up."):
        return KIND_ASUKA_DECODER if cond0.shape[1] == 4 else KIND_AVQ_DECODER
    if "decoder.condition_encoder.layers.0.weight" in tensors:
        return KIND_DIFFUSERS_ASYM_DECODER
    if _any_prefix(keys, "model.diffusion_model."):
        w = tensors.get("model.diffusion_model.input_blocks.0.0.weight")
        if _any_prefix(keys, "conditioner.embedders."):
            return KIND_SDXL
        if w is not None and w.shape[1] == 9:
            return KIND_SD_INPAINT
        return KIND_SD
    if _any_prefix(keys, "double_blocks.") or _any_prefix(keys, "model.diffusion_model.double_blocks."):
        return KIND_FLUX
    if _any_prefix(keys, "decoder.conv_in.") or _any_prefix(keys, "first_stage_model."):
        return KIND_VAE
    if _any_prefix(keys, "text_model.") or _any_prefix(keys, "cond_stage_model."):
        return KIND_TEXT_ENCODER
    if any("lora_" in k for k in keys):
        return KIND_LORA
    if _any_prefix(keys, "input_blocks.") or _any_prefix(keys, "down_blocks."):
        return KIND_UNET
    return KIND_UNKNOWN


KIND_MAE = "an ASUKA MAE prior encoder"
KIND_ALIGNER = "an ASUKA aligner"
KIND_ASUKA_DECODER = "an ASUKA masked decoder"
KIND_AVQ_DECODER = "an Asymmetric VQGAN decoder (original checkpoint)"
KIND_DIFFUSERS_ASYM_DECODER = "an Asymmetric VQGAN decoder (diffusers AsymmetricAutoencoderKL)"
KIND_SD_INPAINT = "a Stable Diffusion 1.x inpainting checkpoint"
KIND_SD = "a Stable Diffusion 1.x/2.x checkpoint"
KIND_SDXL = "an SDXL checkpoint"
KIND_FLUX = "a FLUX diffusion model"
KIND_VAE = "a plain VAE (no masked-decoder branch)"
KIND_TEXT_ENCODER = "a text encoder"
KIND_LORA = "a LoRA"
KIND_UNET = "a diffusion UNet"
KIND_UNKNOWN = "an unrecognised model"

DECODER_KINDS = (KIND_ASUKA_DECODER, KIND_AVQ_DECODER, KIND_DIFFUSERS_ASYM_DECODER)


def expect_kind(ckpt: Checkpoint, wanted: Iterable[str], loader: str, hint: str) -> str:
    """Raise a CheckpointError naming what the file is when it is not one of ``wanted``."""
    kind = identify(ckpt.tensors)
    wanted = tuple(wanted)
    if kind not in wanted:
        raise CheckpointError(
            f"{loader}: '{ckpt.name}' looks like {kind}, not {' or '.join(wanted)}. {hint}"
        )
    return kind
