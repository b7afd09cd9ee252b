"""The ComfyUI internals the pack relies on, checked once when ComfyUI loads the pack.

ComfyUI has no stable Python API beyond its V3 node schema, so the pack names here every
module attribute it uses and the parameters it passes by name. When ComfyUI loads the pack,
``warn_if_changed`` checks them all; if one is gone or its signature changed, one warning
names the pack, this ComfyUI's version, the versions the pack was tested on and what
changed, so the error a node then raises can be traced (docs/compatibility.md lists what
each node does in that case). Nothing here changes what the nodes compute.

It sits beside the package's ``__init__.py``, outside ``nodes/``, so that it still runs when
importing ``nodes/`` itself fails on a changed ComfyUI.
"""

from __future__ import annotations

import importlib
import inspect
import logging

log = logging.getLogger("comfyui-asuka")

PACK = "comfyui-asuka"
TESTED_COMFYUI = ("0.3.75", "0.33.0")

# (module, attribute path, parameters the pack passes by name)
INTERNALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("comfy_api.latest", "ComfyExtension", ()),
    ("comfy_api.latest", "io.ComfyNode", ()),
    ("comfy_api.latest", "io.Schema", ()),
    ("comfy_api.latest", "io.NodeOutput", ()),
    ("folder_paths", "folder_names_and_paths", ()),
    ("folder_paths", "models_dir", ()),
    ("folder_paths", "get_filename_list", ()),
    ("folder_paths", "get_full_path", ()),
    ("folder_paths", "get_folder_paths", ()),
    ("folder_paths", "get_input_directory", ()),
    ("folder_paths", "get_output_directory", ()),
    ("comfy.model_management", "load_models_gpu", ("memory_required", "force_full_load")),
    ("comfy.model_management", "get_torch_device", ()),
    ("comfy.model_management", "intermediate_device", ()),
    ("comfy.model_management", "text_encoder_offload_device", ()),
    ("comfy.model_management", "vae_device", ()),
    ("comfy.model_management", "vae_offload_device", ()),
    ("comfy.model_management", "vae_dtype", ()),
    ("comfy.model_management", "should_use_bf16", ()),
    ("comfy.model_management", "should_use_fp16", ()),
    ("comfy.model_management", "soft_empty_cache", ()),
    ("comfy.model_management", "throw_exception_if_processing_interrupted", ()),
    ("comfy.model_management", "InterruptProcessingException", ()),
    ("comfy.model_patcher", "ModelPatcher", ("load_device", "offload_device")),
    ("comfy.ops", "manual_cast", ()),
    ("comfy.utils", "ProgressBar", ()),
    ("comfy.utils", "ProgressBar.update_absolute", ()),
    ("comfy.utils", "set_attr", ()),
    ("comfy.utils", "set_attr_param", ()),
    ("comfy.samplers", "KSAMPLER", ("extra_options",)),
    ("comfy.sample", "sample", ("denoise", "disable_pbar", "seed")),
    ("comfy.sample", "prepare_noise", ()),
    ("comfy.model_base", "SD_X4Upscaler", ()),
    ("comfy.latent_formats", "SD15", ()),
    ("comfy.ldm.modules.attention", "attention_pytorch", ()),
    ("server", "PromptServer.send_progress_text", ()),
)


def comfy_version() -> str:
    """The running ComfyUI's version ("unknown" where it does not say)."""
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except Exception:  # noqa: BLE001 - a tree without the file: say so, never fail the load
        return "unknown"


def changed_internals() -> list[str]:
    """What of ``INTERNALS`` this ComfyUI lacks, one line each; empty when all are there."""
    problems = []
    for module_name, path, params in INTERNALS:
        where = f"{module_name}.{path}"
        try:
            obj = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except Exception as e:  # noqa: BLE001 - any failure to reach it is the finding
            problems.append(f"{where} is missing ({type(e).__name__}: {e})")
            continue
        if params:
            try:
                have = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue   # no signature to read (a C function): nothing to compare
            gone = [p for p in params if p not in have
                    and not any(v.kind is inspect.Parameter.VAR_KEYWORD for v in have.values())]
            if gone:
                problems.append(f"{where} no longer takes {', '.join(gone)}")
    return problems


def compatibility_report() -> str | None:
    """The warning for this ComfyUI, or None when every internal the pack uses is there."""
    problems = changed_internals()
    if not problems:
        return None
    return (f"{PACK} was tested on ComfyUI {' and '.join(TESTED_COMFYUI)}; this is ComfyUI {comfy_version()}, "
            f"where {len(problems)} of the internals the pack uses changed, so the nodes that use them will "
            "stop with an error (see docs/compatibility.md of the pack): " + "; ".join(problems))


def load_error(error: BaseException) -> str:
    """The message for an import of the pack's nodes that failed on this ComfyUI."""
    return (f"{PACK} could not load its nodes on ComfyUI {comfy_version()} (tested on "
            f"{' and '.join(TESTED_COMFYUI)}): {type(error).__name__}: {error}")


def warn_if_changed() -> str | None:
    """Log ``compatibility_report`` once, when ComfyUI loads the pack; returns it."""
    report = compatibility_report()
    if report:
        log.warning(report)
    return report
