"""Reading model files safely, and telling what a state dict is.

Loading never executes code from a file:

* ``.safetensors`` is read with ``safetensors`` (a header plus raw numbers: nothing to run).
* Pickled PyTorch files (``.pth`` ``.pt`` ``.ckpt`` ``.bin``, both the zip format of
  ``torch.save`` and the older raw-pickle format) are first *dry-run*: every pickle in the
  file is unpickled with an unpickler whose only source of classes and functions hands
  back inert stand-ins, so the complete list of globals the file refers to is known
  before anything real is built. A file that refers to anything outside PyTorch's own
  tensor-rebuilding functions and a short list of training bookkeeping modules (for
  example ``os.system``, ``builtins.exec``, ``subprocess.Popen``) is refused at that point.
* The file is then read with ``torch.load(weights_only=True)``. Released training
  checkpoints also pickle bookkeeping objects (an ``argparse.Namespace`` of training
  arguments, Lightning or OmegaConf hyper-parameters); those classes are never imported:
  each is replaced by an inert stand-in that only records the arguments it was given.
  A dict subclass (Lightning's ``AttributeDict``) becomes a plain ``dict``, the only
  mapping PyTorch's weights-only reader lets a pickle fill item by item; the dry run
  tells which globals those are.

Content, not the file name, decides how a file is read, so a renamed file cannot pick
a less careful path; damaged, truncated, empty, HTML and Git-LFS-pointer "downloads"
get a message saying so.

``identify`` names the kind of model a state dict holds, so that every loader can say
"this is an SD1.5 checkpoint, not an MAE" instead of failing on a missing key.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from .errors import CheckpointError

PICKLE_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
MODEL_EXTENSIONS = PICKLE_EXTENSIONS + SAFETENSORS_EXTENSIONS

# Top-level modules whose classes may appear as bookkeeping inside released training
# checkpoints. They are never imported: each name is replaced by an inert stand-in.
_BOOKKEEPING_MODULES = frozenset({
    "argparse", "omegaconf", "pytorch_lightning", "lightning", "lightning_fabric",
    "numpy", "pathlib", "collections", "typing", "enum", "datetime", "functools",
    "torch", "__main__",
})
# Harmless builtin types that bookkeeping refers to by name (OmegaConf stores ``dict``,
# ``int`` ... as type annotations). Also replaced by stand-ins, never called.
_BOOKKEEPING_NAMES = frozenset(
    f"builtins.{n}" for n in (
        "set", "frozenset", "slice", "complex", "dict", "list", "tuple", "int", "float",
        "str", "bytes", "bool", "object", "range", "bytearray", "NoneType",
    )
)
# Modules whose mere mention in a model file means it was built to run code on load.
_CODE_EXECUTION_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "runpy", "importlib",
    "pty", "socket", "shutil", "code", "codeop", "marshal", "pickle", "_pickle", "ctypes",
    "webbrowser", "multiprocessing", "asyncio", "platform", "commands", "popen2", "pip",
    "operator", "types", "signal", "tempfile", "urllib", "requests", "http",
})

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a pre-zip torch.save file
_MAX_PICKLE_RECORD = 1 << 30  # a data.pkl is a few MB even for huge checkpoints


class UnsafeCheckpointError(CheckpointError):
    """The file would run code (or import arbitrary modules) if unpickled normally."""


@dataclass
class Checkpoint:
    """A state dict (name -> tensor) with the file's metadata and where it came from."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def name(self) -> str:
        return os.path.basename(self.path) or "<state dict>"


# --------------------------------------------------------------------------------------
# Inert stand-ins


class _Inert:
    """Stand-in for a class or function named in a pickle: records what it is given and
    runs nothing. It accepts every way a pickle can fill an object (constructor
    arguments, ``__setstate__``, item assignment, appends)."""

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        self._state = state

    def __setitem__(self, key, value):
        type(self)._filled_by_items = True  # the dry run learns which globals are mappings
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, item):
        self.__dict__.setdefault("_list", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("_list", []).extend(items)

    def __call__(self, *args, **kwargs):  # chained calls (f(x)(y)) stay inert
        return _Inert(*args, **kwargs)

    def __repr__(self):
        return f"<inert stand-in for {type(self).__module__}.{type(self).__name__}>"


def _qualified(module: str, name: str) -> str:
    """``module.name`` with Python 2 names (``__builtin__``, ``copy_reg``) mapped to their
    Python 3 equivalents, as ``pickle`` and PyTorch do for protocol-2 files."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _inert_stand_in(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name or "Unknown", (_Inert,), {"__module__": module or "unknown"})


def _mapping_stand_in(qualified_name: str) -> type:
    """Stand-in for a dict subclass (Lightning's ``AttributeDict``, ``defaultdict``): it
    makes a plain ``dict``, the only kind PyTorch's weights-only reader lets a pickle fill
    item by item. Nothing of the original class runs."""
    module, _, name = qualified_name.rpartition(".")
    return type(name or "Unknown", (), {"__module__": module or "unknown",
                                        "__new__": staticmethod(lambda cls, *args, **kwargs: {})})


class _Found(set):
    """Globals a pickle names; ``mappings`` are those it fills item by item."""

    def __init__(self):
        super().__init__()
        self.mappings: set[str] = set()


def _allowed_bookkeeping(qualified_name: str) -> bool:
    root = qualified_name.split(".", 1)[0]
    return root in _BOOKKEEPING_MODULES or qualified_name in _BOOKKEEPING_NAMES


def _torch_allowed_globals() -> dict:
    """PyTorch's own weights-only allowlist (tensor and storage rebuilders, dtypes ...)."""
    try:
        from torch import _weights_only_unpickler

        return dict(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # a future PyTorch without the private helper: torch.load still checks
        return {}


# --------------------------------------------------------------------------------------
# Dry run: which globals does a pickle refer to?


class _ScanUnpickler(pickle.Unpickler):
    """Unpickles with every class and function replaced by an inert stand-in, and records
    their names. ``find_class`` is the only way a pickle can reach any callable, so
    nothing from the file can run here."""

    def __init__(self, file, found: set[str], stand_ins: dict[str, type]):
        super().__init__(file, encoding="latin1")
        self._found, self._stand_ins = found, stand_ins

    def find_class(self, module, name):
        qualified = _qualified(module, name)
        self._found.add(qualified)
        if qualified not in self._stand_ins:
            self._stand_ins[qualified] = _inert_stand_in(qualified)
        return self._stand_ins[qualified]

    def persistent_load(self, pid):
        return None  # storages: not needed to know the globals


def _scan_pickles(file, count: int, found: set[str]) -> list:
    """Dry-run ``count`` consecutive pickles from an open file, adding the globals they
    name to ``found``; returns what they unpickle to (stand-ins in place of objects)."""
    stand_ins: dict[str, type] = {}
    try:
        return [_ScanUnpickler(file, found, stand_ins).load() for _ in range(count)]
    finally:
        if isinstance(found, _Found):
            found.mappings.update(g for g, cls in stand_ins.items() if cls.__dict__.get("_filled_by_items"))


# --------------------------------------------------------------------------------------
# What is in the file?


def _sniff(path: str) -> str:
    size = os.path.getsize(path)
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"version https://git-lfs"):
        return "lfs"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < 100_000_000:
            return "safetensors"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "html"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text"
    return "unknown"


def _damaged(path: str, why: str = "") -> CheckpointError:
    detail = f" ({why})" if why else ""
    return CheckpointError(
        f"'{os.path.basename(path)}' could not be read{detail}: the file is truncated or damaged. "
        f"It is {os.path.getsize(path):,} bytes; download it again and compare its size with "
        "the one on the download page."
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _refuse(path: str, refused: Iterable[str]) -> UnsafeCheckpointError:
    refused = sorted(refused)
    shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
    runs_code = any(n.split(".", 1)[0] in _CODE_EXECUTION_MODULES for n in refused)
    why = (
        "That is how a malicious checkpoint runs commands on your computer when it is "
        "opened with plain torch.load; treat the file as unsafe and delete it."
        if runs_code else
        "A model file has no reason to contain this."
    )
    return UnsafeCheckpointError(
        f"Refusing to load '{os.path.basename(path)}': unpickling it would call {shown}. {why} "
        "Nothing from the file was run. Get the file from its official source, or a "
        ".safetensors version of it."
    )


def _zip_data_pickle(path: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    if not zipfile.is_zipfile(path):
        raise _damaged(path, "its zip directory is missing")
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise _damaged(path, _first_line(e)) from None
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        zf.close()
        raise CheckpointError(
            f"'{os.path.basename(path)}' is a TorchScript program, not a state dict of weights; "
            "loading it would run its code. Use the original checkpoint or a .safetensors file."
        )
    data = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(data) != 1:
        zf.close()
        raise CheckpointError(
            f"'{os.path.basename(path)}' is a zip file but not one written by torch.save "
            "(no single data.pkl inside). Is it a model file?"
        )
    info = zf.getinfo(data[0])
    if info.file_size > _MAX_PICKLE_RECORD:
        zf.close()
        raise CheckpointError(f"'{os.path.basename(path)}': its data.pkl is implausibly large; refusing it.")
    return zf, info


def _scan_file(path: str, kind: str) -> tuple[set[str], str]:
    """Return (globals, layout) where layout is 'zip', 'legacy' or 'plain'.

    A file that refers to a refused global is refused even when the dry run then fails
    (a malformed pickle can still be malicious)."""
    found = _Found()
    try:
        return _scan_file_into(path, kind, found)
    except CheckpointError:
        refused = [g for g in found if _refused(g)]
        if refused:
            raise _refuse(path, refused) from None
        raise


def _refused(qualified_name: str, torch_allowed: Mapping | None = None) -> bool:
    torch_allowed = _torch_allowed_globals() if torch_allowed is None else torch_allowed
    return qualified_name not in torch_allowed and not _allowed_bookkeeping(qualified_name)


def _scan_file_into(path: str, kind: str, found: set[str]) -> tuple[set[str], str]:
    try:
        if kind == "zip":
            zf, info = _zip_data_pickle(path)
            with zf, zf.open(info) as f:
                _scan_pickles(f, 1, found)
            return found, "zip"
        with open(path, "rb") as f:
            (first,) = _scan_pickles(f, 1, found)
            if type(first) is int and first == _LEGACY_MAGIC_NUMBER:
                _scan_pickles(f, 3, found)  # protocol version, system info, the object
                return found, "legacy"
            return found, "plain"
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, TypeError,
            AttributeError, KeyError, IndexError, struct.error, UnicodeDecodeError,
            RecursionError, MemoryError, OverflowError) as e:
        if isinstance(e, pickle.UnpicklingError) and "truncated" not in str(e):
            raise _damaged(path, f"not a valid pickle: {_first_line(e)}") from None
        raise _damaged(path, _first_line(e)) from None


# --------------------------------------------------------------------------------------
# Loading


def _is_old_protocol_pickle(path: str) -> bool:
    """Whether the file dry-runs as a complete pickle (nothing is run to find out)."""
    try:
        _scan_file(path, "pickle")
        return True
    except UnsafeCheckpointError:
        raise
    except CheckpointError:
        return False


def _read_pickled(path: str, kind: str):
    found, layout = _scan_file(path, kind)
    torch_allowed = _torch_allowed_globals()
    others = {g for g in found if g not in torch_allowed}
    refused = [g for g in others if _refused(g, torch_allowed)]
    if refused:
        raise _refuse(path, refused)
    if layout == "plain":
        raise CheckpointError(
            f"'{os.path.basename(path)}' is a plain Python pickle, not a file written by "
            "torch.save, so it holds no loadable weights. Is it a model file?"
        )
    stand_ins = {g: (_mapping_stand_in(g) if g in found.mappings else _inert_stand_in(g))
                 for g in sorted(others)}
    # torch.load reads a *path* ending in .safetensors as safetensors; a pickle misnamed so
    # is handed over as an open file instead (and then without mmap, which needs a path).
    by_path = not path.lower().endswith(SAFETENSORS_EXTENSIONS)
    try:
        with torch.serialization.safe_globals([(cls, g) for g, cls in stand_ins.items()]):
            if by_path:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=layout == "zip")
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"'{os.path.basename(path)}' could not be read as plain tensor data "
            f"({_first_line(e)}). Nothing from the file was run. Use a .safetensors version "
            "of the file, or convert it with `python -m asuka_core.convert` where it loads."
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure past the dry run means bad bytes
        raise _damaged(path, _first_line(e)) from None


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, metadata
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
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
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _find_weights(obj, depth: int = 0) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and depth < 3:
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                found = _find_weights(inner, depth + 1)
                if found:
                    return found
    return _flatten_tensors(obj)


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Find the weights inside what a training framework saved.

    Accepts a plain state dict, ``{'model': sd}`` (MAE), ``{'state_dict': sd}``
    (Lightning), nestings of those, and DataParallel ``module.`` / torch.compile
    ``_orig_mod.`` prefixes.
    """
    found = _find_weights(obj)
    if found:
        return _strip_prefixes(found)
    if isinstance(obj, _Inert):
        raise CheckpointError(
            f"The file holds a whole pickled Python object ({type(obj).__module__}."
            f"{type(obj).__name__}) instead of a state dict; it cannot be read without running "
            "its code. Re-save it with torch.save(model.state_dict(), ...) where it was made."
        )
    raise CheckpointError("The file holds no model weights (no tensors found). Is it a model file?")


def _strip_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if tensors and all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                stripped = True
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
    base = os.path.basename(path)
    if not path.lower().endswith(MODEL_EXTENSIONS):
        raise CheckpointError(
            f"'{base}' has an unknown extension; use one of {', '.join(MODEL_EXTENSIONS)}."
        )
    kind = _sniff(path)
    if kind in ("text", "unknown") and _is_old_protocol_pickle(path):
        kind = "pickle"  # protocol 0/1 pickles look like text: dry-run them like any pickle
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
    elif kind in ("zip", "pickle"):
        tensors, metadata = unwrap_state_dict(_read_pickled(path, kind)), {}
    elif kind == "empty":
        raise CheckpointError(f"'{base}' is empty (0 bytes): the download did not finish. Download it again.")
    elif kind == "lfs":
        raise CheckpointError(
            f"'{base}' is a Git LFS pointer (a small text file), not the model itself. Download "
            "the real file (the download button on Hugging Face, or `git lfs pull` in a clone)."
        )
    elif kind == "html":
        raise CheckpointError(
            f"'{base}' is a web page, not a model file: the download link returned HTML (often "
            "a login, licence or error page). Download the file again from its model page."
        )
    elif kind == "text":
        raise CheckpointError(f"'{base}' is a text file, not a model file.")
    elif path.lower().endswith(SAFETENSORS_EXTENSIONS):
        raise CheckpointError(
            f"'{base}' is not a readable .safetensors file (no valid header): it is probably "
            "truncated or damaged. Download it again."
        )
    else:
        raise CheckpointError(
            f"'{base}' is neither a PyTorch checkpoint nor a safetensors file (unrecognised "
            "content): it is probably truncated or damaged. Download it again."
        )
    if not tensors:
        raise CheckpointError(f"'{base}' holds no tensors.")
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
    """Write tensors with string metadata. Tensors that share memory (views, tied weights)
    are copied, since the format stores each tensor on its own."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"save_safetensors: '{k}' is a {type(v).__name__}, not a tensor.")
        v = v.detach().to("cpu")
        storage = v.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        if v.numel() and ident in seen:
            v = v.clone()
        elif v.numel():
            seen.add(ident)
        out[k] = v.contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    save_file(out, os.fspath(path), metadata=meta)


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
    if _has(keys, "patch_embed.proj.weight", "decoder_embed.weight"):
        return KIND_MAE
    if _has(keys, "0.weight", "1.linear1.weight", "1.norm.query_norm.scale"):
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

# Short ids for the ``asuka.kind`` safetensors metadata written by the pack.
KIND_IDS = {
    KIND_MAE: "mae",
    KIND_ALIGNER: "aligner",
    KIND_ASUKA_DECODER: "asuka_decoder",
    KIND_AVQ_DECODER: "avq_decoder",
    KIND_DIFFUSERS_ASYM_DECODER: "diffusers_asym_decoder",
}


def expect_kind(ckpt: Checkpoint, wanted: Iterable[str], loader: str, hint: str) -> str:
    """Raise a CheckpointError naming what the file is when it is not one of ``wanted``."""
    kind = identify(ckpt.tensors)
    wanted = tuple(wanted)
    if kind not in wanted:
        raise CheckpointError(
            f"{loader}: '{ckpt.name}' looks like {kind}, not {' or '.join(wanted)}. {hint}"
        )
    return kind
