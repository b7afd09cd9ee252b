"""Learning-rate experiment for aligner training (the paper says AdamW at 5e-2).

Trains the real aligner layout (768 wide, four blocks, fresh initialisation) for a few
steps per learning rate through a tiny random 9-channel UNet built with ComfyUI's own
classes (its cross-attention amplified so the context matters; 768-wide context), a tiny
VAE and a cheap stand-in prior, on synthetic 64 px images, all on the CPU. Every run sees
the same batches (same seed). Prints, per learning rate: held-out loss before and after,
the mean training loss of the first and last ten steps, the relative weight change and
whether anything became non-finite.

    scripts/host.sh python benchmarks/bench_aligner_lr.py [--steps 30] [--lr 1e-4 1e-3 5e-2]

This is a toy: a random UNet is not SD1.5, so it says how the optimiser behaves on this
architecture at these step sizes, not which rate is best for a real run (docs/training.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("ASUKA_COMFY_DIR", os.path.join(REPO, ".host", "ComfyUI"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3, 5e-2])
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    args = parser.parse_args()

    from tests.fixtures import tiny_sd

    tiny_sd.import_comfy()
    import torch

    from asuka_core.training import AlignerTrainer, FrozenModels, TrainConfig, image_sets, new_aligner

    glue = tiny_sd.pack_module("nodes.training_glue")
    mp, vae = tiny_sd.tiny_inpaint_patcher(seed=0), tiny_sd.tiny_vae()
    glue.make_trainable(mp, gradient_checkpointing=False)
    tiny_sd.amplify_context(mp)
    models = FrozenModels(prior=tiny_sd.pooled_prior, encode=tiny_sd.direct_encoder(vae),
                          denoiser=glue.make_denoiser(mp), sigmas=mp.model.model_sampling.sigmas.float(),
                          latent_in=mp.model.process_latent_in)
    tmp = tempfile.mkdtemp(prefix="asuka-lr-")
    tiny_sd.write_synthetic_photos(os.path.join(tmp, "photos"), count=10)
    train, val = image_sets(os.path.join(tmp, "photos"), 64, holdout=0.2)
    print(f"{args.steps} steps, batch {args.batch_size}, 768-wide 4-block aligner, clip {args.clip}, "
          f"{len(train)} train / {len(val)} held-out images, torch threads {torch.get_num_threads()}")
    print(f"{'lr':>8} {'val before':>11} {'val after':>10} {'train 1-10':>11} {'train last10':>12} "
          f"{'|dW|/|W|':>9} {'finite':>6} {'s/step':>7}")
    for lr in args.lr:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup=0, resolution=64,
                          precision="fp32", val_every=0, save_every=0, sample_every=0, log_every=0,
                          p_steps=args.steps, max_grad_norm=args.clip, val_timesteps=4)
        aligner = new_aligner(0)
        w0 = torch.cat([p.detach().flatten().clone() for p in aligner.parameters()])
        tr = AlignerTrainer(cfg, models, train, val, out_dir=os.path.join(tmp, f"lr{lr}"), aligner=aligner,
                            log=lambda s: None)
        before = tr.validation_loss(tr.aligner)
        t0 = time.time()
        finite = True
        for _ in range(args.steps):
            try:
                tr.train_step()
            except FloatingPointError:
                finite = False
                break
        rate = (time.time() - t0) / max(1, len(tr.history["train"]))
        w1 = torch.cat([p.detach().flatten() for p in tr.aligner.parameters()])
        finite = finite and bool(torch.isfinite(w1).all())
        after = tr.validation_loss(tr.aligner) if finite else math.nan
        losses = [v for _, v in tr.history["train"]]
        first, last = sum(losses[:10]) / max(1, len(losses[:10])), sum(losses[-10:]) / max(1, len(losses[-10:]))
        change = float((w1 - w0).norm() / w0.norm())
        print(f"{lr:>8.0e} {before:>11.4f} {after:>10.4f} {first:>11.4f} {last:>12.4f} {change:>9.3f} "
              f"{str(finite):>6} {rate:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
