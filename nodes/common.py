"""ComfyUI glue shared by the pack's nodes: the model folder, loading models under
ComfyUI's model management, progress and out-of-memory handling.

No model maths here: that lives in ``asuka_core``.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from typing import Callable

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths

from ..asuka_core.checkpoint import MODEL_EXTENSIONS
from ..asuka_core.errors import AsukaError, CheckpointError
from ..asuka_core.model_sources import LOADER_INPUTS, missing_files_message

log = logging.getLogger("comfyui-asuka")

MODEL_FOLDER = "asuka"


def register_model_folder() -> None:
    """Add ``models/asuka`` to ComfyUI's model folders.

    Extends, never replaces: another pack or ``extra_model_paths.yaml`` (key ``asuka:``)
    may already have registered paths or extensions under the same name.
    """
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    os.makedirs(default, exist_ok=True)
    entry = folder_paths.folder_names_and_paths.get(MODEL_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([default], set(MODEL_EXTENSIONS))
        return
    paths, extensions = entry
    if default not in paths:
        paths.append(default)
    extensions.update(MODEL_EXTENSIONS)


class _UserErrorTraceback(logging.Filter):
    """Drops the traceback ComfyUI logs after a node fails, when the failure is an
    :class:`AsukaError` (a problem with the user's files or inputs, whose message says what
    to do). ComfyUI's one-line "Exception during processing" record, the error dialog and
    every other traceback are left alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not str(record.msg).startswith("Traceback"):
            return True
        return not isinstance(sys.exc_info()[1], AsukaError)


def quiet_user_errors(logger: logging.Logger | None = None) -> None:
    """Log expected user errors as one line: install :class:`_UserErrorTraceback` on the
    logger ComfyUI's executor writes to (the root logger), once."""
    logger = logger or logging.getLogger()
    if not any(isinstance(f, _UserErrorTraceback) for f in logger.filters):
        logger.addFilter(_UserErrorTraceback())


EXAMPLE_INPUTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows",
                              "input")


def install_example_images() -> list[str]:
    """Copy the example workflows' pictures (``example_workflows/input``) into ComfyUI's input
    folder, so that the templates' LoadImage finds them; a file of the same name that is
    already there is left alone. Returns the names copied."""
    import shutil

    if not os.path.isdir(EXAMPLE_INPUTS):
        return []
    target = folder_paths.get_input_directory()
    copied = []
    for name in sorted(os.listdir(EXAMPLE_INPUTS)):
        src, dst = os.path.join(EXAMPLE_INPUTS, name), os.path.join(target, name)
        if not name.endswith((".png", ".webp")) or os.path.exists(dst):
            continue
        try:
            os.makedirs(target, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(name)
        except OSError as e:  # a read-only input folder must not stop the pack from loading
            log.warning("could not copy the example picture %s to %s: %s", name, target, e)
    return copied


def model_files() -> list[str]:
    return folder_paths.get_filename_list(MODEL_FOLDER)


def missing_model_files(prompt: dict | None) -> list[tuple[str, str, str]]:
    """(node type, folder, file) for every loader input of an API prompt whose file is not
    on this machine. Values without a file extension are built-in choices (VAELoader's
    ``taesd``, ``pixel_space``), not files."""
    missing = []
    for node in (prompt or {}).values():
        if not isinstance(node, dict):
            continue
        node_type, inputs = node.get("class_type"), node.get("inputs") or {}
        for name, folder in LOADER_INPUTS.get(node_type, {}).items():
            value = inputs.get(name)
            if isinstance(value, str) and "." in value and folder_paths.get_full_path(folder, value) is None:
                missing.append((node_type, folder, value))
    return missing


def model_path(name: str, prompt: dict | None = None, node_type: str = "") -> str:
    """The full path of ``models/asuka/<name>``. When it is missing, the error lists every
    missing model file of the prompt (the whole graph), each with its folder and where it
    comes from (``asuka_core.model_sources``)."""
    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if path is not None:
        return path
    missing = missing_model_files(prompt)
    if not any(folder == MODEL_FOLDER and file == name for _, folder, file in missing):
        missing.insert(0, (node_type or "ASUKA loader", MODEL_FOLDER, name))
    folders = {folder: folder_paths.get_folder_paths(folder) for _, folder, _ in missing}
    raise CheckpointError(missing_files_message(missing, folders))


def loader_path(node_cls, name: str) -> str:
    """``model_path`` for a loader node: its prompt (hidden input) gives the other files."""
    hidden = getattr(node_cls, "hidden", None)
    node_id = getattr(getattr(node_cls, "SCHEMA", None), "node_id", "")   # read only: the class may be locked
    return model_path(name, getattr(hidden, "prompt", None), node_id)


ROLE_ENCODER = "encoder"
ROLE_DECODER = "decoder"


def compute_dtype(device: torch.device, role: str = ROLE_ENCODER) -> torch.dtype:
    """The dtype a model is stored and computed in on ``device``, as ComfyUI would choose it.

    encoder (MAE, aligners): bf16 where the device supports it (the official ASUKA inference
    dtype), else fp16 where ComfyUI runs manual-cast models in fp16 (e.g. NVIDIA cards
    before Ampere: GTX 10xx, RTX 20xx), else fp32. In fp16 the residual streams stay in fp32
    (``asuka_core.runtime.residual_dtype``).
    decoder: ComfyUI's rule for VAEs of this family (``vae_dtype`` with bf16/fp32, so fp32 on
    cards without bf16; ``--fp16-vae``/``--bf16-vae``/``--fp32-vae`` override it). A float16
    decode that overflows is redone in float32.
    """
    if role == ROLE_DECODER:
        return mm.vae_dtype(device, [torch.bfloat16, torch.float32])
    if mm.should_use_bf16(device, prioritize_performance=False):
        return torch.bfloat16
    if mm.should_use_fp16(device, prioritize_performance=False, manual_cast=True):
        return torch.float16
    return torch.float32


# Loaded models are shared between nodes that ask for the same unchanged file, as long as
# something (usually ComfyUI's output cache) still holds them: no second copy in memory.
_loaded: "weakref.WeakValueDictionary[tuple, comfy.model_patcher.ModelPatcher]" = weakref.WeakValueDictionary()


def load_patched_model(name: str, loader: Callable, *, role: str, node_cls=None) -> comfy.model_patcher.ModelPatcher:
    """Load ``models/asuka/<name>`` with an ``asuka_core`` loader and wrap it in a
    ModelPatcher, so ComfyUI decides where it lives and when it is offloaded.

    role: "decoder" (placed like a VAE) or "encoder" (MAE, aligner: placed like a text or
    vision encoder). node_cls: the loader node, for the missing-files message.
    """
    path = loader_path(node_cls, name) if node_cls is not None else model_path(name)
    stat = os.stat(path)
    key = (role, loader.__module__, path, stat.st_mtime_ns, stat.st_size)
    cached = _loaded.get(key)
    if cached is not None:
        return cached
    if role == ROLE_DECODER:
        load_device, offload_device = mm.vae_device(), mm.vae_offload_device()
    else:
        load_device, offload_device = mm.get_torch_device(), mm.text_encoder_offload_device()
    dtype = compute_dtype(load_device, role)
    model = loader(path, operations=comfy.ops.manual_cast, dtype=dtype, device=offload_device)
    patcher = patch_model(model, dtype, load_device=load_device, offload_device=offload_device)
    _loaded[key] = patcher
    log.info("loaded %s (%s, %s on %s)", name, type(model).__name__, dtype, load_device)
    return patcher


def patch_model(model: torch.nn.Module, dtype: torch.dtype, *, load_device: torch.device,
                offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """Wrap a model built with ``comfy.ops.manual_cast`` layers in a ModelPatcher.

    The model computes on the patcher's ``load_device`` in ``dtype`` wherever its weights
    are: under ``--lowvram``/``--novram`` ComfyUI moves only some layers (and never the
    tensors outside layers), the rest are cast to the compute device per call.
    """
    model.compute_dtype = dtype
    model.compute_device = load_device
    model.eval().requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def activate(patcher: comfy.model_patcher.ModelPatcher, memory_required: int = 0) -> torch.nn.Module:
    """Ask ComfyUI to place the model on its compute device; returns the module."""
    mm.load_models_gpu([patcher], memory_required=memory_required)
    return patcher.model


def progress_bar(total: int) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback for asuka_core. Updating ComfyUI's bar also
    raises when the user cancels, so long loops stop within one step."""
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update


def notify(node_cls, text: str) -> None:
    """Show ``text`` on the running node in the browser (ComfyUI's progress text), when the
    node runs inside a server; the caller logs it too."""
    hidden = getattr(node_cls, "hidden", None)
    node_id = getattr(hidden, "unique_id", None)
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception as e:  # noqa: BLE001 - a message that cannot be shown must not fail the node
        log.debug("could not show progress text: %s", e)


def is_out_of_memory(error: BaseException) -> bool:
    """True for a real allocation failure. (On CPU-only hosts ComfyUI's OOM_EXCEPTION is
    plain ``Exception``, so it cannot be used to tell OOM from other errors.)"""
    if isinstance(error, (AsukaError, mm.InterruptProcessingException)):
        return False
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def intermediate_device() -> torch.device:
    """Where node outputs live between nodes (normally the CPU)."""
    return mm.intermediate_device()
