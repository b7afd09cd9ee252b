"""Fine-tune an ASUKA-style masked decoder for SD1.5 latents from a folder of photos, with
colour and latent augmentation (see docs/training.md, "Training an SD1.5 masked decoder").

Run it inside the pack's host environment, which has ComfyUI importable::

    scripts/host.sh train-decoder --checkpoint sd-v1-5-inpainting.ckpt \\
        --decoder asymmetric-autoencoder-kl-x-1-5 --lpips-weights alex.pth \\
        --alexnet-weights alexnet-owt-7be5be79.pth --images ~/photos --out runs/my-decoder

or, with another ComfyUI install, with its Python:
``python scripts/train_decoder.py --comfy /path/to/ComfyUI ...``. On several GPUs of one
machine, start it with PyTorch's launcher (one process per GPU, gradients averaged; the
global batch is ``N x --batch-size``)::

    torchrun --nproc-per-node N scripts/train_decoder.py --checkpoint ... --out runs/my-decoder

``--checkpoint`` (a path or a name in models/checkpoints) gives the frozen VAE encoder and,
for the latent augmentation, the inpainting UNet; ``--decoder`` is the start decoder (a
path or a name in models/asuka: an Asymmetric VQGAN decoder, original .ckpt or diffusers
folder) or ``vae`` (the checkpoint's VAE decoder plus a new condition branch). Every input
is checked before the first step. The run folder gets ``<name>.safetensors`` (EMA weights,
the original Asymmetric VQGAN layout that Load ASUKA Masked Decoder loads as it is),
``training_state.pt`` (``--resume``), ``loss.png``, ``samples/step_*.png`` and
``log.jsonl``. Ctrl-C saves the state before stopping.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_cli  # noqa: E402  (ComfyUI set-up shared with train_aligner.py)
from train_cli import pack_module, resolve  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train_cli.add_common_args(p)
    p.add_argument("--checkpoint", required=True, help="SD1.5 inpainting checkpoint (path or name): VAE and UNet")
    p.add_argument("--decoder", default="vae", help="start decoder: a path or a name in models/asuka "
                   "(Asymmetric VQGAN base / x1.5 / x2), or 'vae' (the VAE decoder + a new condition branch)")
    p.add_argument("--images", required=True, help="folder of training photos (sub-folders included)")
    p.add_argument("--out", required=True, help="run folder (created; reused with --resume)")
    p.add_argument("--name", default="asuka_sd15_decoder", help="file name of the trained decoder")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--lpips-weights", default=None, help="LPIPS v0.1 linear layers (alex.pth of the lpips package)")
    p.add_argument("--alexnet-weights", default=None, help="torchvision ImageNet AlexNet (alexnet-owt-7be5be79.pth)")
    p.add_argument("--l1-weight", type=float, default=1.0)
    p.add_argument("--lpips-weight", type=float, default=1.0, help="0: no LPIPS (then no weight files needed)")
    p.add_argument("--no-logvar", action="store_true", help="fixed log-variance 0 instead of a learned one")
    p.add_argument("--disc-start", type=int, default=10000, help="step from which the patch-GAN loss is on")
    p.add_argument("--disc-weight", type=float, default=0.8, help="factor on the adaptive GAN weight")
    p.add_argument("--disc-factor", type=float, default=1.0, help="0: no GAN")
    p.add_argument("--latent-aug-prob", type=float, default=0.5, help="share of latents replaced by the UNet's "
                   "one-step estimate (0: no UNet needed)")
    p.add_argument("--latent-aug-t", type=int, nargs=2, default=(500, 1000), metavar=("LOW", "HIGH"),
                   help="timestep range [LOW, HIGH) of the one-step estimate")
    p.add_argument("--jitter", type=float, nargs=4, default=(0.15, 0.2, 0.1, 0.03),
                   metavar=("B", "C", "S", "H"), help="ColorJitter brightness, contrast, saturation, hue")
    p.add_argument("--object-masks", default=None, help="folder of object masks (white on black)")
    p.add_argument("--steps", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=10, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--lr-final", type=float, default=0.0, help="cosine decay to lr * this (1: constant)")
    p.add_argument("--pretrained-lr-scale", type=float, default=0.1,
                   help="lr factor of the VAE decoder's weights when a new condition branch is trained")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="0: no clipping")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="autocast dtype (default: bf16 where supported, else fp16 on GPU, fp32 on CPU)")
    p.add_argument("--holdout", type=float, default=0.05, help="share of images held out (1..16 images)")
    p.add_argument("--val-every", type=int, default=1000)
    p.add_argument("--save-every", type=int, default=2000)
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--sample-count", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU (very slow; for tests)")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return train_cli.main(parse_args(argv), run)


def run(args, errors) -> int:
    training = pack_module("asuka_core.training")
    glue = pack_module("nodes.training_glue")
    node = pack_module("nodes.decoder_training")

    dist, device, precision, say = train_cli.setup(args)
    cfg = training.DecoderTrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
        lr_final=args.lr_final, pretrained_lr_scale=args.pretrained_lr_scale, ema_decay=args.ema_decay,
        max_grad_norm=args.max_grad_norm, l1_weight=args.l1_weight, lpips_weight=args.lpips_weight,
        learn_logvar=not args.no_logvar, disc_start=args.disc_start, disc_weight=args.disc_weight,
        disc_factor=args.disc_factor, jitter=tuple(args.jitter), latent_aug_prob=args.latent_aug_prob,
        latent_aug_t=tuple(args.latent_aug_t), resolution=args.resolution, seed=args.seed, precision=precision,
        val_every=args.val_every, save_every=args.save_every, sample_every=args.sample_every,
        sample_count=args.sample_count, log_every=args.log_every)
    cfg.check()
    # everything is checked before the first step: data, LPIPS files, checkpoint, start decoder
    train_set, val_set = training.image_sets(args.images, args.resolution, holdout=args.holdout, seed=args.seed)
    say(f"{len(train_set)} training images, {len(val_set)} held out, {args.resolution} px", flush=True)
    perceptual = node.perceptual_net(args.lpips_weight, args.lpips_weights, args.alexnet_weights)
    ckpt_path = resolve(args.checkpoint, "checkpoints", "Checkpoint", errors)
    aug = args.latent_aug_prob > 0
    model, clip, vae, _ = train_cli.load_checkpoint(ckpt_path, errors, output_clip=aug, output_model=aug)
    meta = {"asuka.training.base_model": os.path.basename(ckpt_path)}
    if dist.distributed:
        meta["asuka.training.processes"] = str(dist.world_size)
    with glue.training_mode():
        decoder, fresh, start = node.build_start_decoder(
            args.decoder, vae, lambda v: resolve(v, "asuka", "Start decoder", errors), seed=args.seed)
        frozen, device, note = node.frozen_models(vae, model, clip, latent_augmentation=aug)
        trainer = training.DecoderTrainer(
            cfg, frozen, decoder, train_set, val_set, out_dir=args.out, device=device, perceptual=perceptual,
            fresh_prefixes=fresh, object_masks=args.object_masks, export_name=args.name + ".safetensors",
            log=lambda s: print(s, flush=True), metadata={**meta, "asuka.training.start_decoder": start},
            dist=dist)
        train_cli.resume_or_refuse(trainer, args, errors, say)
        say(f"training {start} on {device} ({precision}, masks: {trainer.masks.object_source}"
            + (f", {note}" if note else "") + train_cli.processes_note(dist, trainer.global_batch) + ")", flush=True)
        try:
            result = trainer.run()
        finally:
            training.distributed.shutdown(dist)
    if not dist.is_main:
        return 0
    print(f"done: {result['decoder']} (step {result['steps']}, held-out loss {result['val_loss']})", flush=True)
    print("copy it into ComfyUI/models/asuka/ and pick it in Load ASUKA Masked Decoder; curve: "
          f"{result['loss_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
