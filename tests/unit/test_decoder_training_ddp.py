"""Data-parallel masked-decoder training (torchrun, DDP over gloo, 2 CPU processes) equals
a single process with the same global batch, with the patch-GAN on from the first step (so
both optimisers, the discriminator's BatchNorm and the adaptive weight are covered): the
same averaged gradients, losses and weights; the run resumes on another number of processes.

The frozen side is test_decoder_training's tiny pure-PyTorch stand-in (no ComfyUI): a fixed
strided convolution as the VAE encoder and a small fixed epsilon model for the latent
augmentation. This file
is also the torchrun worker (``python -m torch.distributed.run ... FILE OUT PHOTOS STEPS``).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.fixtures import decoder_files, tiny_sd  # noqa: E402
from tests.unit.test_decoder_training import frozen  # noqa: E402  (fixed tiny encoder and UNet stand-ins)
from tests.unit.test_training_ddp import run_torchrun  # noqa: E402

RES, PER_RANK, ACCUM, LR = 64, 2, 2, 1e-3


def assert_same_training(a: dict, b: dict, steps: int, share: float):
    """Weights of two runs that computed the same thing up to float rounding. Adam's first
    update is about ``lr * sign(gradient)``: where a gradient is zero in exact arithmetic
    (a conv bias just before a GroupNorm, the attention's key bias) its rounding noise
    decides the sign, so such elements may differ by up to ``2 lr`` per step, and after the
    first step that difference feeds into every later gradient. At least ``share`` of all
    elements agree closely."""
    assert a.keys() == b.keys()
    total = close = 0
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert (x - y).abs().max() <= 2 * LR * steps + 1e-6, k
        total += x.numel()
        close += int(torch.isclose(x, y, rtol=1e-4, atol=5e-6).sum())
    assert close >= share * total, f"only {close} of {total} elements agree"


def assert_same_gradients(a: dict, b: dict):
    """Averaged gradients against one process's: within 1e-4 of each tensor's largest."""
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4 * float(b[k].abs().max()) + 1e-7, msg=k)


def gradients(tr) -> dict:
    """The gradients the last optimiser step used: decoder, discriminator, log-variance."""
    out = {f"decoder.{k}": p.grad.clone() for k, p in tr.decoder.named_parameters() if p.grad is not None}
    out.update({f"disc.{k}": p.grad.clone() for k, p in tr.disc.named_parameters() if p.grad is not None})
    out["logvar"] = tr.logvar.grad.clone()
    return out


def trainer(photos, out, *, batch_size, steps, dist=None):
    from asuka_core.training import DecoderTrainConfig, DecoderTrainer, image_sets, start_decoder

    cfg = DecoderTrainConfig(steps=steps, batch_size=batch_size, grad_accum=ACCUM, lr=LR, resolution=RES,
                             precision="fp32", lpips_weight=0.0, disc_start=0, disc_width=8, disc_layers=2,
                             val_every=0, save_every=0, sample_every=0, sample_count=0, log_every=0,
                             ema_decay=0.9)
    train, val = image_sets(photos, RES, holdout=0.25)
    decoder = start_decoder(decoder_files.avq_ldm_state_dict(31, z_channels=4, ch=32, num_res_blocks=1))
    return DecoderTrainer(cfg, frozen(), decoder, train, val, out_dir=str(out), log=lambda s: None,
                          dist=dist)


def worker(out: str, photos: str, steps: int) -> None:
    from asuka_core.training import distributed

    info = distributed.init_from_env("cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    tr = trainer(photos, out, batch_size=PER_RANK, steps=steps, dist=info)
    tr.run()
    torch.save(gradients(tr), os.path.join(out, f"grad{info.rank}.pt"))
    with open(os.path.join(out, f"rank{info.rank}.txt"), "w") as f:   # what each rank trained on
        f.write(repr([tr._micro_batch(s, m)["masks"].sum().item() for s in range(steps) for m in range(ACCUM)]))
    distributed.shutdown(info)


def test_two_gloo_processes_train_the_decoder_as_one_with_the_same_global_batch(tmp_path):
    photos = str(tmp_path / "photos")
    tiny_sd.write_synthetic_photos(photos)
    steps = 1
    state = run_torchrun(tmp_path / "ddp", photos, steps, script=os.path.abspath(__file__))
    assert state["world_size"] == 2 and state["step"] == steps

    one = trainer(photos, tmp_path / "one", batch_size=2 * PER_RANK, steps=steps)
    start = {k: v.clone() for k, v in one.decoder.state_dict().items()}
    disc_start = {k: v.clone() for k, v in one.disc.state_dict().items()}
    for _ in range(steps):
        one.train_step()
    assert len(one.history["d"]) == steps            # the GAN and its discriminator step ran every step
    g0, g1 = (torch.load(tmp_path / "ddp" / f"grad{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(g0[k], g1[k]) for k in g0)                 # averaged: the same on both ranks
    assert_same_gradients(g0, gradients(one))                          # ... and the global batch's
    assert_same_training(state["decoder"], one.decoder.state_dict(), steps, 0.999)
    assert_same_training(state["ema"]["shadow"], one.ema.shadow, steps, 0.999)
    assert_same_training(state["disc"], one.disc.state_dict(), steps, 0.999)   # incl. BatchNorm running stats
    torch.testing.assert_close(state["logvar"], one.logvar.detach(), rtol=1e-4, atol=1e-6)
    # the comparisons mean something: decoder and discriminator weights moved by far more
    # than the two runs differ
    for ddp, single, before in ((state["decoder"], one.decoder.state_dict(), start),
                                (state["disc"], one.disc.state_dict(), disc_start)):
        moved = sum(float((single[k].double() - before[k].double()).abs().sum()) for k in before)
        apart = sum(float((ddp[k].double() - single[k].double()).abs().sum()) for k in before)
        assert moved > 1e-3 and apart < 0.1 * moved, (moved, apart)
    # the losses (averaged over the ranks) agree to rounding
    hist = json.loads(state["history"])
    for key in ("train", "d"):
        got, want = [v for _, v in hist[key]], [v for _, v in one.history[key]]
        assert len(got) == len(want) == steps
        assert abs(got[0] - want[0]) <= 1e-6 * abs(want[0]), key
    # the two ranks trained on different halves of each global batch
    assert (tmp_path / "ddp" / "rank0.txt").read_text() != (tmp_path / "ddp" / "rank1.txt").read_text()

    # Resumed by a single process with the same global batch (2 x 2 -> 4 x 1): one more step
    # continues as the single-process run does ...
    resumed = trainer(photos, tmp_path / "ddp", batch_size=2 * PER_RANK, steps=steps + 1)
    resumed.resume()
    assert resumed.step == steps
    loss = resumed.train_step()
    one.config.steps = steps + 1
    assert abs(loss - one.train_step()) <= 1e-3 * abs(loss)
    assert_same_training(resumed.decoder.state_dict(), one.decoder.state_dict(), steps + 1, 0.9)
    assert_same_training(resumed.disc.state_dict(), one.disc.state_dict(), steps + 1, 0.9)

    # ... but not with another global batch.
    from asuka_core.errors import InputError

    with pytest.raises(InputError, match=r"global batch \(batch_size x processes\) 2 x 2 -> 2 x 1"):
        trainer(photos, tmp_path / "ddp", batch_size=PER_RANK, steps=steps + 1).resume()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
