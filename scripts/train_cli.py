"""What the training scripts (``train_aligner.py``, ``train_decoder.py``) share: importing
ComfyUI and this pack, one GPU per torchrun process, resolving model names, the common
command-line options, the checkpoint load, the resume-or-refuse rule and the error exits.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "comfyui_asuka"


def add_common_args(p) -> None:
    """``--comfy`` first (the rest of the options are the script's own)."""
    p.add_argument("--comfy", default=os.environ.get("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI")),
                   help="ComfyUI folder")


def pin_gpu_per_process() -> None:
    """Under torchrun with several processes, let each see only its own GPU (the
    LOCAL_RANK-th visible one) before CUDA starts, so ComfyUI's model management puts
    that process's models there as ``cuda:0``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return
    local = int(os.environ["LOCAL_RANK"])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(64)]
    if local < len(ids):
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local]


def import_comfy(comfy_dir: str, cpu: bool):
    if not os.path.isfile(os.path.join(comfy_dir, "main.py")):
        sys.exit(f"error: '{comfy_dir}' is not a ComfyUI folder (no main.py); pass --comfy")
    sys.path.insert(0, comfy_dir)  # first: ComfyUI's `nodes` module must win over this pack's package
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401


def pack_module(name: str):
    """Import a module of this pack as ComfyUI does (the repository as one package)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, os.path.join(REPO, "__init__.py"),
                                                      submodule_search_locations=[REPO])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.{name}")


def resolve(value: str, folder: str, what: str, errors) -> str:
    if os.path.isfile(value):
        return value
    import folder_paths

    if folder == "asuka" and folder not in folder_paths.folder_names_and_paths:
        pack_module("nodes.common").register_model_folder()
    path = folder_paths.get_full_path(folder, value)
    if path is None:
        raise errors.InputError(f"{what} '{value}' is neither a file nor a name in ComfyUI's models/{folder}.")
    return path


def main(args, run) -> int:
    """ComfyUI set up for ``args`` (``--comfy``, ``--cpu``; one GPU per torchrun process),
    then ``run(args, errors)``; the pack's errors and Ctrl-C become exit codes 2 and 130."""
    if not args.cpu:
        pin_gpu_per_process()
    import torch

    cpu = args.cpu or not (torch.cuda.is_available() or getattr(torch.backends, "mps", None)
                           and torch.backends.mps.is_available())
    import_comfy(os.path.abspath(args.comfy), cpu)
    errors = pack_module("asuka_core.errors")
    try:
        return run(args, errors)
    except errors.AsukaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130


def setup(args):
    """Join torchrun's process group (a no-op for one process): ``(dist, device, precision,
    say)``, ``say`` printing on rank 0 only, ``precision`` ``--precision`` or the device's best."""
    import comfy.model_management as mm

    training = pack_module("asuka_core.training")
    dist = training.distributed.init_from_env(mm.get_torch_device())
    device = dist.device
    say = print if dist.is_main else (lambda *a, **k: None)
    precision = args.precision or ("fp32" if device.type == "cpu" else
                                   "bf16" if mm.should_use_bf16(device, prioritize_performance=False) else "fp16")
    return dist, device, precision, say


def load_checkpoint(path: str, errors, **kwargs):
    """ComfyUI's ``load_checkpoint_guess_config`` with a clear error for a file that is not
    an SD1.5 inpainting checkpoint or has no VAE."""
    import comfy.sd

    try:
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, embedding_directory=None, **kwargs)
    except RuntimeError as e:
        raise errors.CheckpointError(
            f"ComfyUI could not load '{path}' as a checkpoint ({str(e).splitlines()[0]}). Give an SD1.5 "
            "inpainting checkpoint (.safetensors or .ckpt with UNet, VAE).") from None
    if out[2] is None:
        raise errors.CheckpointError(f"'{path}' has no VAE; use a full SD1.5 inpainting checkpoint.")
    return out


def resume_or_refuse(trainer, args, errors, say) -> None:
    """``--resume`` restores the run in ``--out``; without it an existing run there is refused."""
    if args.resume:
        trainer.resume()
        say(f"resumed at step {trainer.step}", flush=True)
    elif os.path.exists(trainer.state_path):
        raise errors.InputError(f"'{args.out}' already holds a run (training_state.pt). Add --resume to continue "
                                "it, or choose another --out folder.")


def processes_note(dist, global_batch: int) -> str:
    return f", {dist.world_size} processes, global batch {global_batch}" if dist.distributed else ""
