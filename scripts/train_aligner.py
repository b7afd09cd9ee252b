"""Train an SD1.5 ASUKA aligner from a folder of photos, with an SD1.5 inpainting
checkpoint frozen (see docs/training.md).

Run it inside the pack's host environment, which has ComfyUI importable::

    scripts/host.sh train-aligner --checkpoint sd-v1-5-inpainting.ckpt --mae mae_300.pth \\
        --images ~/photos --out runs/my-aligner --steps 20000

or, with another ComfyUI install, with its Python:
``python scripts/train_aligner.py --comfy /path/to/ComfyUI ...``. On several GPUs of one
machine, start it with PyTorch's launcher (one process per GPU, gradients averaged; the
global batch is ``N x --batch-size``)::

    torchrun --nproc-per-node N scripts/train_aligner.py --checkpoint ... --out runs/my-aligner

``--init asuka_alignment_clip.pt`` starts from the released FLUX CLIP-branch aligner (same
layout; untested whether it helps, see docs/training.md).

The checkpoint is loaded with ComfyUI's own loader (``--checkpoint`` is a path or a name
in ComfyUI's models/checkpoints); ``--mae`` is a path or a name in models/asuka. Every
input is checked before the first step. The run folder gets the aligner
(``<name>.safetensors``, EMA weights, ``asuka.target = sd15``, loadable by Load ASUKA
Aligner as it is), ``training_state.pt`` (resume with ``--resume``), ``loss.png``,
``samples/step_*.png`` and ``log.jsonl``. Ctrl-C saves the state before stopping.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_cli  # noqa: E402  (ComfyUI set-up shared with train_decoder.py)
from train_cli import REPO, import_comfy, pack_module, pin_gpu_per_process, resolve  # noqa: E402,F401


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train_cli.add_common_args(p)
    p.add_argument("--checkpoint", required=True, help="SD1.5 inpainting checkpoint (path or name)")
    p.add_argument("--mae", required=True, help="ASUKA MAE file, e.g. mae_300.pth (path or name in models/asuka)")
    p.add_argument("--images", required=True, help="folder of training photos (sub-folders included)")
    p.add_argument("--out", required=True, help="run folder (created; reused with --resume)")
    p.add_argument("--name", default="asuka_sd15_aligner", help="file name of the trained aligner")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--init", default=None, help="start from this aligner (path or name in models/asuka): an SD1.5 "
                   "aligner, or the released FLUX CLIP-branch asuka_alignment_clip.pt (same layout; untested whether "
                   "it helps)")
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
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that decode, crop and mask the next batches while the GPU trains (0: in the "
                   "training loop; Linux only, elsewhere 0)")
    p.add_argument("--prefetch", type=int, default=2, help="batches each worker keeps ready")
    p.add_argument("--cache-dir", default=None, help="keep copies of the photos pre-scaled to what the crops need "
                   "here (made on first use; much faster than decoding large JPEGs every time; pixels differ "
                   "slightly from the originals, so keep the setting for a run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU (very slow; for tests)")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(4, per_process - 1)) if sys.platform.startswith("linux") else 0


def main(argv=None) -> int:
    return train_cli.main(parse_args(argv), run)


def run(args, errors) -> int:
    import torch

    training = pack_module("asuka_core.training")
    glue = pack_module("nodes.training_glue")
    mae_mod = pack_module("asuka_core.mae")

    dist, device, precision, say = train_cli.setup(args)
    cfg = training.TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
        lr_final=args.lr_final, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
        p_start=args.p_start, p_end=args.p_end, p_steps=args.p_steps, resolution=args.resolution,
        seed=args.seed, precision=precision, val_every=args.val_every, val_timesteps=args.val_timesteps,
        save_every=args.save_every,
        sample_every=args.sample_every if args.sample_steps > 0 else 0, log_every=args.log_every,
        workers=args.workers, prefetch=args.prefetch)
    cfg.check()
    # 1. data (every image opened once), 2. models: all before the first step
    train_set, val_set = training.image_sets(args.images, args.resolution, holdout=args.holdout, seed=args.seed,
                                             cache_dir=args.cache_dir)
    say(f"{len(train_set)} training images, {len(val_set)} held out, {args.resolution} px", flush=True)
    ckpt_path = resolve(args.checkpoint, "checkpoints", "Checkpoint", errors)
    mae_path = resolve(args.mae, "asuka", "MAE file", errors)
    mae_dtype = torch.float32 if device.type == "cpu" else (torch.bfloat16 if precision == "bf16" else torch.float16)
    mae = mae_mod.load_mae(mae_path, dtype=mae_dtype, device=device)
    model, _, vae, _ = train_cli.load_checkpoint(ckpt_path, errors, output_clip=False)
    glue.check_inpainting_model(model, vae, name=f"'{os.path.basename(ckpt_path)}'")
    memory = glue.training_memory(args.batch_size, args.resolution, precision=precision,
                                  gradient_checkpointing=not args.no_gradient_checkpointing)
    models, device = glue.frozen_models(model, vae, mae, sample_steps=args.sample_steps, memory_required=memory,
                                        gradient_checkpointing=not args.no_gradient_checkpointing)
    aligner, meta = None, {"asuka.training.base_model": os.path.basename(ckpt_path)}
    if args.init:
        init_path = resolve(args.init, "asuka", "--init aligner", errors)
        aligner = training.warm_start_aligner(init_path)
        meta["asuka.training.init"] = os.path.basename(init_path)
    if dist.distributed:
        meta["asuka.training.processes"] = str(dist.world_size)
    trainer = training.AlignerTrainer(
        cfg, models, train_set, val_set, out_dir=args.out, device=device, aligner=aligner,
        object_masks=args.object_masks, export_name=args.name + ".safetensors",
        log=lambda s: print(s, flush=True), metadata=meta, dist=dist)
    train_cli.resume_or_refuse(trainer, args, errors, say)
    say(f"training on {device} ({precision}, masks: {trainer.masks.object_source}, {trainer.stream.workers} data "
        f"workers" + train_cli.processes_note(dist, trainer.batches.global_batch) + ")", flush=True)
    try:
        with glue.training_mode():
            result = trainer.run()
    finally:
        training.distributed.shutdown(dist)
    if not dist.is_main:
        return 0
    print(f"done: {result['aligner']} (step {result['steps']}, held-out loss {result['val_loss']})", flush=True)
    print(f"copy it into ComfyUI/models/asuka/ and pick it in Load ASUKA Aligner; curve: {result['loss_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
