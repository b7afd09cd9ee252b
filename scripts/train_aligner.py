"""Train an SD1.5 ASUKA aligner from a folder of photos, with an SD1.5 inpainting
checkpoint frozen (see docs/training.md).

Run it inside the pack's host environment, which has ComfyUI importable::

    scripts/host.sh train-aligner --checkpoint sd-v1-5-inpainting.ckpt --mae mae_300.pth \\
        --images ~/photos --out runs/my-aligner --steps 20000

or, with another ComfyUI install, with its Python:
``python scripts/train_aligner.py --comfy /path/to/ComfyUI ...``.

The checkpoint is loaded with ComfyUI's own loader (``--checkpoint`` is a path or a name
in ComfyUI's models/checkpoints); ``--mae`` is a path or a name in models/asuka. Every
input is checked before the first step. The run folder gets the aligner
(``<name>.safetensors``, EMA weights, ``asuka.target = sd15``, loadable by Load ASUKA
Aligner as it is), ``training_state.pt`` (resume with ``--resume``), ``loss.png``,
``samples/step_*.png`` and ``log.jsonl``. Ctrl-C saves the state before stopping.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "comfyui_asuka"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--comfy", default=os.environ.get("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI")),
                   help="ComfyUI folder")
    p.add_argument("--checkpoint", required=True, help="SD1.5 inpainting checkpoint (path or name)")
    p.add_argument("--mae", required=True, help="ASUKA MAE file, e.g. mae_300.pth (path or name in models/asuka)")
    p.add_argument("--images", required=True, help="folder of training photos (sub-folders included)")
    p.add_argument("--out", required=True, help="run folder (created; reused with --resume)")
    p.add_argument("--name", default="asuka_sd15_aligner", help="file name of the trained aligner")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--init", default=None, help="start from this aligner file (.safetensors, target sd15)")
    p.add_argument("--object-masks", default=None, help="folder of object masks (white on black) for the "
                   "object-shaped mask family; default: random silhouettes")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--lr-final", type=float, default=1.0, help="< 1: cosine decay to lr * this")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="autocast dtype (default: bf16 where supported, else fp16 on GPU, fp32 on CPU)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--p-start", type=float, default=1.0)
    p.add_argument("--p-end", type=float, default=0.1)
    p.add_argument("--p-steps", type=int, default=2000)
    p.add_argument("--holdout", type=float, default=0.05, help="share of images held out (1..16 images)")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-timesteps", type=int, default=4, help="timesteps per held-out image")
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps of the sample images (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU (very slow; for tests)")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


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


def main(argv=None) -> int:
    args = parse_args(argv)
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


def run(args, errors) -> int:
    import torch

    import comfy.model_management as mm
    import comfy.sd

    training = pack_module("asuka_core.training")
    glue = pack_module("nodes.training_glue")
    mae_mod = pack_module("asuka_core.mae")
    aligner_mod = pack_module("asuka_core.aligner")

    device = mm.get_torch_device()
    precision = args.precision or ("fp32" if device.type == "cpu" else
                                   "bf16" if mm.should_use_bf16(device, prioritize_performance=False) else "fp16")
    cfg = training.TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
        lr_final=args.lr_final, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
        p_start=args.p_start, p_end=args.p_end, p_steps=args.p_steps, resolution=args.resolution,
        seed=args.seed, precision=precision, val_every=args.val_every, val_timesteps=args.val_timesteps,
        save_every=args.save_every,
        sample_every=args.sample_every if args.sample_steps > 0 else 0, log_every=args.log_every)
    cfg.check()
    # 1. data (every image opened once), 2. models: all before the first step
    train_set, val_set = training.image_sets(args.images, args.resolution, holdout=args.holdout, seed=args.seed)
    print(f"{len(train_set)} training images, {len(val_set)} held out, {args.resolution} px", flush=True)
    ckpt_path = resolve(args.checkpoint, "checkpoints", "Checkpoint", errors)
    mae_path = resolve(args.mae, "asuka", "MAE file", errors)
    mae_dtype = torch.float32 if device.type == "cpu" else (torch.bfloat16 if precision == "bf16" else torch.float16)
    mae = mae_mod.load_mae(mae_path, dtype=mae_dtype, device=device)
    try:
        model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=False,
                                                                 embedding_directory=None)
    except RuntimeError as e:
        raise errors.CheckpointError(
            f"ComfyUI could not load '{ckpt_path}' as a checkpoint ({str(e).splitlines()[0]}). Give an SD1.5 "
            "inpainting checkpoint (.safetensors or .ckpt with UNet, VAE).") from None
    if vae is None:
        raise errors.CheckpointError(f"'{ckpt_path}' has no VAE; use a full SD1.5 inpainting checkpoint.")
    glue.check_inpainting_model(model, vae, name=f"'{os.path.basename(ckpt_path)}'")
    memory = glue.training_memory(args.batch_size, args.resolution, precision=precision,
                                  gradient_checkpointing=not args.no_gradient_checkpointing)
    models, device = glue.frozen_models(model, vae, mae, sample_steps=args.sample_steps, memory_required=memory,
                                        gradient_checkpointing=not args.no_gradient_checkpointing)
    aligner = None
    if args.init:
        aligner = aligner_mod.load_aligner(args.init, dtype=torch.float32)
        aligner.expect_target(aligner_mod.TARGET_SD15, where="--init")
    trainer = training.AlignerTrainer(
        cfg, models, train_set, val_set, out_dir=args.out, device=device, aligner=aligner,
        object_masks=args.object_masks, export_name=args.name + ".safetensors",
        log=lambda s: print(s, flush=True),
        metadata={"asuka.training.base_model": os.path.basename(ckpt_path)})
    if args.resume:
        trainer.resume()
        print(f"resumed at step {trainer.step}", flush=True)
    elif os.path.exists(trainer.state_path):
        raise errors.InputError(f"'{args.out}' already holds a run (training_state.pt). Add --resume to continue "
                                "it, or choose another --out folder.")
    print(f"training on {device} ({precision}, masks: {trainer.masks.object_source})", flush=True)
    with glue.training_mode():
        result = trainer.run()
    print(f"done: {result['aligner']} (step {result['steps']}, held-out loss {result['val_loss']})", flush=True)
    print(f"copy it into ComfyUI/models/asuka/ and pick it in Load ASUKA Aligner; curve: {result['loss_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
