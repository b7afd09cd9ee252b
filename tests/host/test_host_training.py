"""Aligner training through ComfyUI, on CPU with a tiny SD1.5 inpainting checkpoint that
ComfyUI's own loader accepts (``tests/fixtures/tiny_sd.py``: SD15 detection, EPS, 9
channels, ~14 M UNet parameters + the SD VAE):

* the CLI (``scripts/train_aligner.py``, what ``scripts/host.sh train-aligner`` runs) trains,
  saves, and its aligner file loads and drives the SD1.5 example workflow in the real
  server;
* the CLI refuses a non-inpainting checkpoint before training (the image checks are unit
  tests);
* the committed training example (ASUKA_TrainAligner) trains inside the server (under
  ComfyUI's inference mode), its aligner output feeds the SD1.5 graph in the same prompt,
  and Cancel stops a run with a resumable state saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.fixtures import tiny_sd
from tests.host.comfy_client import REPO, Graph, box_mask, make_picture, unique
from tests.host.conftest import _cached, _source_hash

pytestmark = pytest.mark.host

TRAIN_SCRIPT = os.path.join(REPO, "scripts", "train_aligner.py")
sys.path.insert(0, os.path.join(REPO, "scripts"))
import workflows  # noqa: E402  (scripts/workflows.py)
RES = 64


@pytest.fixture(scope="module")
def tiny_checkpoints(sd15_checkpoint, comfy_dir) -> dict:
    """Names (in the server's checkpoints folder) and paths of the 9- and 4-channel tiny checkpoints."""
    tiny_sd.import_comfy()
    folder = os.path.dirname(sd15_checkpoint)
    key = _source_hash(tiny_sd)
    out = {}
    for channels in (9, 4):
        path = _cached(folder, f"asuka-test-tiny-sd15-{channels}ch.safetensors", key,
                       lambda p, c=channels: tiny_sd.write_tiny_inpaint_checkpoint(p, in_channels=c))
        out[channels] = path
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("train-photos"))
    tiny_sd.write_synthetic_photos(d, count=4)
    return d


def run_cli(comfy_dir: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN_SCRIPT, "--comfy", comfy_dir, "--cpu", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})


def test_cli_trains_and_its_aligner_drives_the_sd15_example(host, comfy, comfy_dir, tiny_checkpoints, photos,
                                                            tmp_path):
    from asuka_core.aligner import load_aligner

    name = unique("trained_aligner").replace("-", "_")
    run_dir = tmp_path / "run"
    proc = run_cli(comfy_dir, "--checkpoint", tiny_checkpoints[9],
                   "--mae", os.path.join(host.models.folder, host.models.mae), "--images", photos,
                   "--out", str(run_dir), "--name", name, "--steps", "1", "--batch-size", "1",
                   "--resolution", str(RES), "--warmup", "0", "--val-every", "1", "--val-timesteps", "1",
                   "--save-every", "0", "--sample-steps", "1", "--log-every", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "held-out loss" in proc.stdout and "done:" in proc.stdout, proc.stdout
    aligner_file = run_dir / f"{name}.safetensors"
    for f in (aligner_file, run_dir / "training_state.pt", run_dir / "loss.png",
              run_dir / "samples" / "step_000001.png", run_dir / "log.jsonl"):
        assert f.is_file(), f
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    assert state["step"] == 1
    aligner = load_aligner(str(aligner_file))
    assert (aligner.target, aligner.width, aligner.depth) == ("sd15", 768, 4)
    for k, v in aligner.state_dict().items():           # the exported weights are the EMA
        assert torch.equal(v, state["ema"]["shadow"][k]), k
    from safetensors import safe_open

    with safe_open(str(aligner_file), "pt") as f:
        meta = f.metadata()
    assert meta["asuka.training.steps"] == "1"
    assert meta["asuka.training.base_model"] == os.path.basename(tiny_checkpoints[9])
    assert [json.loads(x)["step"] for x in open(run_dir / "log.jsonl")] == [1]

    # The file, as it is, in the committed SD1.5 example workflow.
    os.symlink(aligner_file, os.path.join(host.models.folder, aligner_file.name))
    info = comfy.object_info()
    with open(workflows.path("asuka_sd15_inpaint")) as f:
        prompt = workflows.to_api_prompt(json.load(f), info)
    size = 128
    picture, mask = make_picture(size, seed=12), box_mask(size)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = host.checkpoint
    by_type["LoadImage"]["image"] = comfy.upload_image(picture, mask)
    by_type["ASUKA_MAELoader"]["mae_name"] = host.models.mae
    by_type["ASUKA_AlignerLoader"]["aligner_name"] = aligner_file.name
    by_type["ASUKA_DecoderLoader"]["decoder_name"] = host.models.avq_decoder
    by_type["KSampler"]["steps"] = 2
    by_type["SaveImage"]["filename_prefix"] = unique("trained")
    result = comfy.run(prompt, timeout=600)
    assert result.ok, result.describe()
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    out = comfy.image(result, save_id)
    assert out.shape == (size, size, 3)
    keep = mask == 0
    assert np.abs(out[keep].astype(int) - picture[keep].astype(int)).max() <= 1


def test_cli_refuses_a_non_inpainting_checkpoint_before_training(host, comfy_dir, tiny_checkpoints, photos, tmp_path):
    mae = os.path.join(host.models.folder, host.models.mae)
    common = ["--mae", mae, "--steps", "2", "--batch-size", "1", "--resolution", str(RES)]

    run_dir = tmp_path / "plain"
    proc = run_cli(comfy_dir, "--checkpoint", tiny_checkpoints[4], "--images", photos, "--out", str(run_dir),
                   *common)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "non-inpainting" in proc.stderr and "9 input channels" in proc.stderr, proc.stderr
    assert not (run_dir / "training_state.pt").exists()


def _training_graph(tiny_name: str, mae: str, folder: str, run_name: str, steps: int) -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", _id="ckpt", ckpt_name=tiny_name)
    mae_node = g.add("ASUKA_MAELoader", _id="mae", mae_name=mae)
    train = g.add("ASUKA_TrainAligner", _id="train", model=ckpt[0], vae=ckpt[2], mae=mae_node[0],
                  images_folder=folder, steps=steps, batch_size=1, grad_accum=1, learning_rate=1e-4,
                  resolution=RES, precision="auto", gradient_checkpointing=True, run_name=run_name,
                  resume=False, seed=0, save_to_models=False)
    g.add("SaveImage", _id="curve", images=train[1], filename_prefix=unique("curve"))
    return g


def _upload_photos(comfy, photos: str) -> str:
    sub = unique("asuka_photos")
    dst = os.path.join(comfy.input_dir, sub)
    os.makedirs(dst)
    for f in sorted(os.listdir(photos)):
        os.symlink(os.path.join(photos, f), os.path.join(dst, f))
    return sub


def test_train_example_workflow_runs_in_the_server(host, comfy, tiny_checkpoints, photos):
    """The committed training example, converted as the Queue button does, with the tiny
    checkpoint, 2 steps at 64 px: the node trains under ComfyUI's inference mode, its
    aligner drives the SD1.5 graph in the same prompt, and the run folder is written."""
    with open(workflows.path("asuka_sd15_train_aligner")) as f:
        prompt = workflows.to_api_prompt(json.load(f), comfy.object_info())
    picture, mask = make_picture(RES, seed=13), box_mask(RES)
    run_name = unique("node_run").replace("-", "_")
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = os.path.basename(tiny_checkpoints[9])
    by_type["LoadImage"]["image"] = comfy.upload_image(picture, mask)
    by_type["ASUKA_MAELoader"]["mae_name"] = host.models.mae
    by_type["ASUKA_DecoderLoader"]["decoder_name"] = host.models.avq_decoder
    by_type["KSampler"]["steps"] = 2
    by_type["SaveImage"]["filename_prefix"] = unique("node-trained")
    train = by_type["ASUKA_TrainAligner"]
    assert train["learning_rate"] == 1e-4 and train["resolution"] == 512 and train["resume"] is False
    train.update(images_folder=_upload_photos(comfy, photos), steps=2, batch_size=1, resolution=RES,
                 run_name=run_name, save_to_models=False)
    result = comfy.run(prompt, timeout=600)
    assert result.ok, result.describe()
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    out = comfy.image(result, save_id)
    assert out.shape == (RES, RES, 3)
    assert np.abs(out[mask == 0].astype(int) - picture[mask == 0].astype(int)).max() <= 1
    run_dir = os.path.join(comfy.output_dir, "asuka_training", run_name)
    assert os.path.isfile(os.path.join(run_dir, run_name + ".safetensors"))
    assert os.path.isfile(os.path.join(run_dir, "loss.png"))
    assert torch.load(os.path.join(run_dir, "training_state.pt"), weights_only=True)["step"] == 2


def test_cancel_stops_training_and_keeps_a_resumable_state(host, comfy, tiny_checkpoints, photos):
    folder = _upload_photos(comfy, photos)
    run_name = unique("cancelled_run").replace("-", "_")
    g = _training_graph(os.path.basename(tiny_checkpoints[9]), host.models.mae, folder, run_name, 100_000)
    run_dir = os.path.join(comfy.output_dir, "asuka_training", run_name)
    pid, body = comfy.queue(g.prompt())
    assert pid, body
    t0 = time.time()
    # log.jsonl gets its first line after the pre-flight pass, the first held-out
    # evaluation and the first step: cancel then.
    while not os.path.isfile(os.path.join(run_dir, "log.jsonl")):
        assert time.time() - t0 < 300, "training never started:\n" + comfy.log_tail()
        time.sleep(0.5)
    t_int = time.time()
    comfy.interrupt()
    res = comfy.wait(pid, timeout=300)
    stopped_after = time.time() - t_int
    assert res.status == "error" and res.interrupted, res.describe()
    assert stopped_after < 60, f"took {stopped_after:.1f}s to stop after /interrupt"
    state = torch.load(os.path.join(run_dir, "training_state.pt"), weights_only=True)
    assert 1 <= state["step"] < 100_000


def _training_example(comfy, host, tiny_checkpoints, photos, picture, mask) -> dict:
    with open(workflows.path("asuka_sd15_train_aligner")) as f:
        prompt = workflows.to_api_prompt(json.load(f), comfy.object_info())
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = os.path.basename(tiny_checkpoints[9])
    by_type["LoadImage"]["image"] = comfy.upload_image(picture, mask, name="train-cache.png")
    by_type["ASUKA_MAELoader"]["mae_name"] = host.models.mae
    by_type["ASUKA_DecoderLoader"]["decoder_name"] = host.models.avq_decoder
    by_type["KSampler"]["steps"] = 2
    by_type["SaveImage"]["filename_prefix"] = unique("train-cache")
    by_type["ASUKA_TrainAligner"].update(images_folder=_upload_photos(comfy, photos), steps=2, batch_size=1,
                                         resolution=RES, run_name=unique("cache_run").replace("-", "_"),
                                         save_to_models=False)
    return prompt


def test_a_plain_prompt_gives_the_same_pixels_before_and_after_the_training_node(host, comfy, tiny_checkpoints,
                                                                                 photos):
    """ComfyUI keeps the loaded checkpoint for later prompts: the training node (a backward
    pass through that UNet) must leave it as it was. The plain prompt is the training
    example with the test aligner file in place of the training node."""
    picture, mask = make_picture(RES, seed=17), box_mask(RES)
    train = _training_example(comfy, host, tiny_checkpoints, photos, picture, mask)
    trainer = next(k for k, v in train.items() if v["class_type"] == "ASUKA_TrainAligner")
    plain = json.loads(json.dumps(train))
    plain["loaded_aligner"] = {"class_type": "ASUKA_AlignerLoader", "inputs": {"aligner_name": host.models.sd15_aligner}}
    for node_key, node in list(plain.items()):
        if any(v == [trainer, 1] for v in node["inputs"].values()):
            del plain[node_key]                                 # the loss-curve preview
        for key, value in node["inputs"].items():
            if value == [trainer, 0]:
                node["inputs"][key] = ["loaded_aligner", 0]
    del plain[trainer]
    save = next(k for k, v in plain.items() if v["class_type"] == "SaveImage")
    loader = next(k for k, v in plain.items() if v["class_type"] == "CheckpointLoaderSimple")
    sampler = next(k for k, v in plain.items() if v["class_type"] == "KSampler")
    before = comfy.run(plain, timeout=600)
    assert before.ok, before.describe()
    trained = comfy.run(train, timeout=600)
    assert trained.ok, trained.describe()
    plain[save]["inputs"]["filename_prefix"] = unique("train-cache-after")
    after = comfy.run(plain, timeout=600)
    assert after.ok, after.describe()
    assert sampler not in after.cached_nodes, "the sampler did not run again"
    assert loader in after.cached_nodes, "the checkpoint was loaded again, so the cached model was not tested"
    assert np.array_equal(comfy.image(before, save), comfy.image(after, save)), \
        "a plain prompt gives other pixels after the training node"
