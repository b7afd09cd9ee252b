"""Warm start from the released FLUX CLIP-branch aligner, through ComfyUI, on CPU:

* ``train_aligner.py --init asuka_alignment_clip.pt`` (a random file in the released
  format, from the test models folder) trains with DataLoader workers, exports an SD1.5
  aligner that starts from the released weights, and that file runs in the SD1.5 graph in
  the real server;
* the FLUX CLIP aligner itself runs in the SD1.5 graph only with the conditioning node's
  experimental switch on (refused without it: test_host_robustness.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.host.comfy_client import box_mask, make_picture, read_records, sd15_inpaint_graph, unique
from tests.host.test_host_training import photos, run_cli, tiny_checkpoints  # noqa: F401  (fixtures)

pytestmark = pytest.mark.host
RES = 64


def run_sd15_graph(comfy, host, aligner_name: str, *, experimental: bool = False):
    size = 128
    picture, mask = make_picture(size, seed=21), box_mask(size)
    record = os.path.join(host.record_dir, f"init-{unique()}.jsonl")
    g = sd15_inpaint_graph(checkpoint=host.checkpoint, mae=host.models.mae, aligner=aligner_name,
                           image=comfy.upload_image(picture, mask), record_path=record, seed=3,
                           prefix=unique("init"))
    prompt = g.prompt()
    if experimental:
        prompt["cond"]["inputs"]["experimental_flux_clip"] = True
    return comfy.run(prompt, timeout=600), record


def test_cli_init_from_the_released_clip_aligner_trains_and_runs_in_the_sd15_graph(
        host, comfy, comfy_dir, tiny_checkpoints, photos, tmp_path):  # noqa: F811
    from asuka_core.aligner import load_aligner

    released_path = os.path.join(host.models.folder, host.models.flux_aligner)
    released = load_aligner(released_path, dtype=torch.float32)
    assert released.target == "flux_clip"
    name = unique("warm_aligner").replace("-", "_")
    run_dir = tmp_path / "run"
    proc = run_cli(comfy_dir, "--checkpoint", tiny_checkpoints[9],
                   "--mae", os.path.join(host.models.folder, host.models.mae), "--images", photos,
                   "--out", str(run_dir), "--name", name, "--steps", "2", "--batch-size", "1",
                   "--resolution", str(RES), "--warmup", "0", "--val-every", "0", "--save-every", "0",
                   "--sample-steps", "0", "--log-every", "1", "--workers", "1",
                   "--init", released_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "1 data workers" in proc.stdout, proc.stdout
    aligner_file = run_dir / f"{name}.safetensors"
    trained = load_aligner(str(aligner_file))
    assert (trained.target, trained.width, trained.depth) == ("sd15", 768, 4)
    start, end = released.state_dict(), trained.state_dict()
    diff = max(float((end[k] - start[k]).abs().max()) for k in start)
    assert 0 < diff < 5e-3, diff        # two AdamW steps of lr 1e-4 away from the released weights

    os.symlink(aligner_file, os.path.join(host.models.folder, aligner_file.name))
    res, record = run_sd15_graph(comfy, host, aligner_file.name)
    assert res.ok, res.describe()
    assert read_records(record) and all(r["finite"] for r in read_records(record))


def test_experimental_switch_lets_the_flux_clip_aligner_condition_sd15(host, comfy):
    res, record = run_sd15_graph(comfy, host, host.models.flux_aligner, experimental=True)
    assert res.ok, res.describe()
    assert read_records(record), "the sampler did not run"
    res, record = run_sd15_graph(comfy, host, host.models.flux_aligner, experimental=False)
    assert not res.ok and "experimental_flux_clip" in res.describe()
    assert not read_records(record)


def test_cli_under_torchrun_trains_on_two_gloo_processes(host, comfy_dir, tiny_checkpoints, photos,  # noqa: F811
                                                         tmp_path):
    import subprocess
    import sys

    from safetensors import safe_open

    from tests.host.test_host_training import TRAIN_SCRIPT

    run_dir = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", TRAIN_SCRIPT,
         "--comfy", comfy_dir, "--cpu", "--checkpoint", tiny_checkpoints[9],
         "--mae", os.path.join(host.models.folder, host.models.mae), "--images", photos, "--out", str(run_dir),
         "--steps", "2", "--batch-size", "1", "--resolution", str(RES), "--warmup", "0", "--val-every", "1",
         "--val-timesteps", "1", "--save-every", "0", "--sample-steps", "0", "--log-every", "1", "--workers", "1"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "2 processes, global batch 2" in proc.stdout, proc.stdout
    assert proc.stdout.count("done:") == 1                 # rank 0 alone reports and saves
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 2
    with safe_open(str(run_dir / "asuka_sd15_aligner.safetensors"), "pt") as f:
        assert f.metadata()["asuka.training.processes"] == "2"
