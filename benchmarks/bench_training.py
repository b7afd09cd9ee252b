"""Aligner training: where the time of a step goes, and a warm start compared with a fresh start.

1. **Data**: one training crop from a large JPEG (``--photo-size``, default 4000x3000) read
   directly and from the pre-scaled cache, and one mask, at ``--resolution``.
2. **Step split**: ``--steps`` optimiser steps of the real loop (``AlignerTrainer.train_step``)
   with the frozen models timed per call: data (time the loop waits for its batch), MAE,
   VAE, UNet forward, backward, optimiser (+EMA), the rest (aligner forward, loss); then the
   UNet forward+backward alone on the same inputs (the floor), and step / floor. The photos
   are large JPEGs, so with ``--workers 0`` the data cost is on the critical path and with
   workers it should vanish from it.
   ``--model tiny``: a tiny UNet/VAE from ComfyUI's classes and a stand-in prior (fast);
   ``--model sd15``: the full-size SD1.5 inpainting checkpoint (``--checkpoint``, default the
   random-weight one the host tests build in ``.host/cache``), loaded by ComfyUI, and a
   full-size random MAE, through the same glue the trainer uses.
3. **Warm start** (``--compare-init N``): N steps on the tiny setup from a fresh aligner and
   from a file in the released ``asuka_alignment_clip.pt`` format (``--init``; default a
   random one written by the test fixtures: without the real file this checks the
   mechanics, not whether the released weights help), held-out loss every 10 steps.

    scripts/host.sh python benchmarks/bench_training.py --model tiny --workers 0 2
    scripts/host.sh python benchmarks/bench_training.py --model sd15 --resolution 256 --batch-size 1 --steps 2
    scripts/host.sh python benchmarks/bench_training.py --skip-split --compare-init 30

The same script runs on a GPU (``--device cuda``; timings CUDA-synchronised).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI"))


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, timings: dict, name: str, device):
    def wrapper(*a, **k):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*a, **k)
        sync(device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    return wrapper


def write_photos(folder: str, count: int, size: tuple[int, int]) -> None:
    """Large structured JPEGs (smooth colour fields, edges and noise), quality 92."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    w, h = size
    for i in range(count):
        rng = np.random.default_rng(i)
        small = (rng.random((h // 64, w // 64, 3)) * 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"photo_{i}.jpg"), quality=92)


def bench_data(args, photos: str, cache: str) -> None:
    from asuka_core.masks import TRAINING_SHARES, MaskGenerator
    from asuka_core.training import image_sets

    train, _ = image_sets(photos, args.resolution, holdout=0.1)
    cached, _ = image_sets(photos, args.resolution, holdout=0.1, cache_dir=cache)
    for i in range(len(cached)):                     # make the cache first (once per photo)
        cached.read(i)

    def per_call(fn, n):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        return (time.perf_counter() - t0) / n

    direct = per_call(lambda i: train.sample(i, seed=i), 3)
    from_cache = per_call(lambda i: cached.sample(i, seed=i), 6)
    masks = MaskGenerator(args.resolution, seed=0, shares=TRAINING_SHARES)
    mask = per_call(masks, 20)
    print(f"data, {args.photo_size[0]}x{args.photo_size[1]} JPEG -> {args.resolution} px crop: "
          f"{direct:.3f} s direct, {from_cache:.3f} s from the pre-scaled cache ({direct / from_cache:.1f}x); "
          f"mask {mask:.3f} s", flush=True)


def tiny_models(glue, tiny_sd):
    from asuka_core.training import FrozenModels

    mp, vae = tiny_sd.tiny_inpaint_patcher(seed=0), tiny_sd.tiny_vae()
    glue.make_trainable(mp, gradient_checkpointing=False)
    tiny_sd.amplify_context(mp)
    return FrozenModels(prior=tiny_sd.pooled_prior, encode=tiny_sd.direct_encoder(vae),
                        denoiser=glue.make_denoiser(mp), sigmas=mp.model.model_sampling.sigmas.float(),
                        latent_in=mp.model.process_latent_in)


def sd15_models(args, glue, tmp):
    import comfy.sd
    import torch

    from asuka_core.mae import load_mae
    from tests.fixtures import mae_files

    ckpt = args.checkpoint or os.path.join(REPO, ".host", "cache", "models", "checkpoints",
                                           "asuka-test-sd15-inpainting-random.safetensors")
    if not os.path.isfile(ckpt):
        sys.exit(f"no checkpoint at {ckpt}: pass --checkpoint (an SD1.5 inpainting checkpoint) or build the "
                 "random one by running a host test once")
    mae_path = os.path.join(tmp, "mae.pth")
    mae_files.write_official_mae_pth(mae_path)
    mae = load_mae(mae_path, dtype=torch.float32, device=args.device)
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=False,
                                                             embedding_directory=None)
    models, device = glue.frozen_models(model, vae, mae, sample_steps=0,
                                        gradient_checkpointing=args.gradient_checkpointing)
    args.device = str(device)                    # where ComfyUI put the models
    return models


def bench_split(args, photos: str, tmp: str, glue, tiny_sd) -> None:
    import torch
    import torch.nn.functional as F

    from asuka_core.training import AlignerTrainer, TrainConfig, image_sets, new_aligner

    models = tiny_models(glue, tiny_sd) if args.model == "tiny" else sd15_models(args, glue, tmp)
    timings: dict[str, float] = {}
    models.prior = timed(models.prior, timings, "MAE", args.device)
    models.encode = timed(models.encode, timings, "VAE", args.device)
    models.denoiser = timed(models.denoiser, timings, "UNet fwd", args.device)
    train, val = image_sets(photos, args.resolution, holdout=0.1)
    print(f"\nstep split: {args.model} models, {args.resolution} px, batch {args.batch_size}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {len(train)} training photos "
          f"{args.photo_size[0]}x{args.photo_size[1]} (read directly, no cache)", flush=True)
    print(f"{'workers':>7} {'step s':>7} {'data':>6} {'MAE':>6} {'VAE':>6} {'UNet fwd':>8} {'backward':>8} "
          f"{'optim':>6} {'rest':>6} {'floor s':>7} {'step/floor':>10}", flush=True)
    for workers in args.workers:
        cfg = TrainConfig(steps=args.steps + 1, batch_size=args.batch_size, lr=1e-4, warmup=0,
                          resolution=args.resolution, precision="fp32" if args.device == "cpu" else args.precision,
                          val_every=0, save_every=0, sample_every=0, log_every=0, workers=workers, prefetch=2)
        tr = AlignerTrainer(cfg, models, train, val, out_dir=os.path.join(tmp, f"w{workers}"), device=args.device,
                            aligner=new_aligner(0), log=lambda s: None)
        tr.train_step()                          # warm-up (allocations, worker start)
        if workers:
            time.sleep(2.0)                      # as in a long run: the workers are ahead
        timings.clear()
        tr.timings = timings
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step()
        sync(args.device)
        step = (time.perf_counter() - t0) / args.steps
        tr.timings = None
        tr.stream.close()
        per = {k: v / args.steps for k, v in timings.items()}
        # The floor: the UNet forward + backward to its context alone, on inputs of this size.
        mb = tr._micro_batch(0, 0)
        with torch.no_grad():
            feats = tr._prior(mb["images"], mb["masks"])
            z0, masked = tr._latents(mb["images"], mb["masks"])
            ctx = tr.aligner(feats).detach()
        sigma = models.sigmas.to(args.device)[mb["t"].to(args.device)]
        x = z0 + sigma.view(-1, 1, 1, 1) * mb["noise"].to(args.device)
        floors = []
        for _ in range(args.steps):
            c = ctx.clone().requires_grad_(True)
            sync(args.device)
            t1 = time.perf_counter()
            with tr._autocast():
                eps = models.denoiser(x, sigma, c, masked, mb["masks"].to(args.device))
            F.mse_loss(eps.float(), mb["noise"].to(args.device)).backward()
            sync(args.device)
            floors.append(time.perf_counter() - t1)
        floor = statistics.median(floors)
        rest = step - sum(per.get(k, 0.0) for k in ("data", "MAE", "VAE", "UNet fwd", "backward", "optimizer"))
        print(f"{workers:>7} {step:>7.3f} {per.get('data', 0):>6.3f} {per.get('MAE', 0):>6.3f} "
              f"{per.get('VAE', 0):>6.3f} {per.get('UNet fwd', 0):>8.3f} {per.get('backward', 0):>8.3f} "
              f"{per.get('optimizer', 0):>6.3f} {rest:>6.3f} {floor:>7.3f} {step / floor:>10.2f}", flush=True)


def bench_init(args, glue, tiny_sd, tmp: str) -> None:
    from asuka_core.training import AlignerTrainer, TrainConfig, image_sets, new_aligner, warm_start_aligner
    from tests.fixtures import aligner_files

    init = args.init
    if init is None:
        init = os.path.join(tmp, "asuka_alignment_clip.pt")
        aligner_files.write_official_aligner_pt(init, 768, seed=0)
        what = "a random file in the released format (mechanics only)"
    else:
        what = os.path.basename(init)
    models = tiny_models(glue, tiny_sd)
    folder = os.path.join(tmp, "small-photos")
    tiny_sd.write_synthetic_photos(folder, count=10)
    train, val = image_sets(folder, 64, holdout=0.2)
    print(f"\nwarm start: {args.compare_init} steps, batch 2, 64 px, tiny UNet, lr 1e-4; --init = {what}", flush=True)
    curves = {}
    for label, aligner in (("fresh", new_aligner(0)), ("--init", warm_start_aligner(init))):
        cfg = TrainConfig(steps=args.compare_init, batch_size=2, lr=1e-4, warmup=0, resolution=64, precision="fp32",
                          val_every=0, save_every=0, sample_every=0, log_every=0, p_steps=args.compare_init)
        tr = AlignerTrainer(cfg, models, train, val, out_dir=os.path.join(tmp, label.strip("-")), aligner=aligner,
                            log=lambda s: None)
        curve = [(0, tr.validation_loss(tr.aligner))]
        while tr.step < args.compare_init:
            tr.train_step()
            if tr.step % 10 == 0 or tr.step == args.compare_init:
                curve.append((tr.step, tr.validation_loss(tr.aligner)))
        curves[label] = curve
    steps = [s for s, _ in curves["fresh"]]
    print("held-out loss  " + " ".join(f"{'step ' + str(s):>9}" for s in steps))
    for label, curve in curves.items():
        print(f"{label:<14} " + " ".join(f"{v:>9.4f}" for _, v in curve), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--checkpoint", default=None, help="SD1.5 inpainting checkpoint for --model sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data worker counts to compare")
    p.add_argument("--photo-size", type=int, nargs=2, default=[4000, 3000], metavar=("W", "H"))
    p.add_argument("--photos", type=int, default=6, help="number of large photos written")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", help="autocast on GPUs")
    p.add_argument("--gradient-checkpointing", action="store_true", help="(sd15) as the trainer's default on GPUs")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--skip-split", action="store_true")
    p.add_argument("--compare-init", type=int, default=0, help="warm-start comparison steps (0: skip)")
    p.add_argument("--init", default=None, help="aligner file for the warm start (default: random, released format)")
    args = p.parse_args()

    from tests.fixtures import tiny_sd

    if args.device == "cpu":
        tiny_sd.import_comfy()                   # ComfyUI in CPU mode
    else:                                        # ComfyUI picks the GPU (--model sd15)
        sys.path.append(os.environ["ASUKA_COMFY_DIR"])
        import comfy.cli_args

        comfy.cli_args.args.use_pytorch_cross_attention = True
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
    glue = tiny_sd.pack_module("nodes.training_glue")
    with tempfile.TemporaryDirectory(prefix="asuka-bench-train-") as tmp:
        photos = os.path.join(tmp, "photos")
        if not (args.skip_data and args.skip_split):
            write_photos(photos, args.photos, tuple(args.photo_size))
        if not args.skip_data:
            bench_data(args, photos, os.path.join(tmp, "cache"))
        if not args.skip_split:
            bench_split(args, photos, tmp, glue, tiny_sd)
        if args.compare_init:
            bench_init(args, glue, tiny_sd, tmp)


if __name__ == "__main__":
    main()
