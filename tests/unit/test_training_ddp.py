"""Data-parallel aligner training (torchrun, DDP over gloo, 2 CPU processes) equals a
single process with the same global batch; a run resumes on another number of processes.

The frozen side is a tiny pure-PyTorch stand-in (no ComfyUI: fast process start-up): a
fixed strided convolution as the VAE, the pooled stand-in prior, and a small denoiser
that cross-attends to the aligner's tokens. This file is also the torchrun worker
(``python -m torch.distributed.run ... test_training_ddp.py OUT PHOTOS STEPS``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.fixtures import tiny_sd  # noqa: E402

RES, WIDTH = 64, 32          # the aligner is 768 wide (one block), so it exports as sd15
PER_RANK, ACCUM = 2, 2


class TinyDenoiser(nn.Module):
    """eps_hat from [x_in, masked latent, mask] with one cross-attention to the context."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.inp = nn.Conv2d(9, WIDTH, 3, padding=1)
        self.q = nn.Linear(WIDTH, WIDTH)
        self.k = nn.Linear(768, WIDTH)
        self.v = nn.Linear(768, WIDTH)
        self.out = nn.Conv2d(WIDTH, 4, 3, padding=1)
        self.requires_grad_(False)

    def forward(self, x, sigma, context, masked_latent, mask):
        x_in = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        m = F.interpolate(mask[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
        h = self.inp(torch.cat([x_in, m, masked_latent], 1))
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        att = torch.softmax(self.q(tokens) @ self.k(context).transpose(1, 2) / math.sqrt(c), -1) @ self.v(context)
        return self.out(h + att.transpose(1, 2).reshape(b, c, hh, ww))


def tiny_models():
    from asuka_core.training import FrozenModels

    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 8, stride=8).requires_grad_(False)
    sigmas = torch.linspace(0.03, 14.6, 1000)
    return FrozenModels(prior=tiny_sd.pooled_prior, encode=lambda img: conv(img.movedim(-1, 1) * 2 - 1),
                        denoiser=TinyDenoiser(), sigmas=sigmas)


def trainer(photos, out, *, batch_size, steps, dist=None):
    from asuka_core.training import AlignerTrainer, TrainConfig, image_sets, new_aligner

    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=ACCUM, lr=2e-4, warmup=1, resolution=RES,
                      precision="fp32", val_every=0, save_every=0, sample_every=0, log_every=0, p_steps=2,
                      ema_decay=0.9)
    train, val = image_sets(photos, RES, holdout=0.25)
    return AlignerTrainer(cfg, tiny_models(), train, val, out_dir=str(out), aligner=new_aligner(3, depth=1),
                          log=lambda s: None, dist=dist)


def worker(out: str, photos: str, steps: int) -> None:
    from asuka_core.training import distributed

    info = distributed.init_from_env("cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    tr = trainer(photos, out, batch_size=PER_RANK, steps=steps, dist=info)
    tr.run()
    with open(os.path.join(out, f"rank{info.rank}.txt"), "w") as f:   # what each rank trained on
        f.write(repr([tr.batches(n)["masks"].sum().item() for n in range(steps * ACCUM)]))
    distributed.shutdown(info)


def run_torchrun(out, photos, steps, script=__file__):
    """Run ``script``'s worker in 2 gloo processes under torchrun; its saved training state."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.abspath(script), str(out), photos, str(steps)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(os.path.join(out, "training_state.pt"), weights_only=True)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-6, msg=k)


def test_two_gloo_processes_equal_one_with_the_same_global_batch(tmp_path):
    import json

    photos = str(tmp_path / "photos")
    tiny_sd.write_synthetic_photos(photos)
    steps = 2
    state = run_torchrun(tmp_path / "ddp", photos, steps)
    assert state["world_size"] == 2 and state["step"] == steps

    one = trainer(photos, tmp_path / "one", batch_size=2 * PER_RANK, steps=steps)
    for _ in range(steps):
        one.train_step()
    assert_same_weights(state["aligner"], one.aligner.state_dict())
    assert_same_weights(state["ema"]["shadow"], one.ema.shadow)
    start = trainer(photos, tmp_path / "x", batch_size=1, steps=1).aligner.state_dict()   # the initial weights
    moved = sum(float((state["aligner"][k] - start[k]).abs().sum()) for k in start)
    assert moved > 1e-3                     # the weights did move: the comparison means something
    ddp_losses = [v for _, v in json.loads(state["history"])["train"]]
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor([v for _, v in one.history["train"]]),
                               rtol=1e-5, atol=1e-7)

    # The two ranks trained on different halves of each global batch.
    r0 = (tmp_path / "ddp" / "rank0.txt").read_text()
    r1 = (tmp_path / "ddp" / "rank1.txt").read_text()
    assert r0 != r1

    # Resumed by a single process with the same global batch (2 x 2 -> 4 x 1): one more step
    # continues as the single-process run does.
    resumed = trainer(photos, tmp_path / "ddp", batch_size=2 * PER_RANK, steps=steps + 1)
    resumed.resume()
    resumed.train_step()
    one.config.steps = steps + 1
    one.train_step()
    assert_same_weights(resumed.aligner.state_dict(), one.aligner.state_dict())

    # ... but not with another global batch.
    import pytest

    from asuka_core.errors import InputError

    with pytest.raises(InputError, match=r"global batch \(batch_size x processes\) 2 x 2 -> 2 x 1"):
        trainer(photos, tmp_path / "ddp", batch_size=PER_RANK, steps=steps + 1).resume()


def test_shards_partition_the_global_batch():
    from asuka_core.training.distributed import DistInfo, shard

    parts = [list(shard(3, DistInfo(rank=r, world_size=4))) for r in range(4)]
    assert sorted(sum(parts, [])) == list(range(12)) and all(len(p) == 3 for p in parts)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
