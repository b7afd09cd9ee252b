"""Masked-decoder training through ComfyUI, on CPU with the tiny SD1.5 inpainting
checkpoint that ComfyUI's own loader accepts (``tests/fixtures/tiny_sd.py``):

* the CLI (``scripts/train_decoder.py``, what ``scripts/host.sh train-decoder`` runs) trains
  a tiny Asymmetric VQGAN decoder with LPIPS, the GAN and the latent augmentation through
  the inpainting UNet; the exported file, as it is, is what ASUKA_DecoderLoader loads in the
  committed SD1.5 example workflow in the real server;
* the CLI refuses a non-inpainting checkpoint and a FLUX decoder before training;
* the node (ASUKA_TrainDecoder) trains from the checkpoint's own VAE decoder with a new
  condition branch inside the server (under ComfyUI's inference mode), and its decoder
  output decodes in the same prompt; Cancel stops a run with a resumable state saved.
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

from tests.host.comfy_client import REPO, Graph, box_mask, make_picture, unique
from tests.host.test_host_training import _upload_photos, photos, tiny_checkpoints  # noqa: F401  (fixtures)
from tests.unit.test_evaluate_learned import lpips_files  # noqa: F401  (fixture)

pytestmark = pytest.mark.host

TRAIN_SCRIPT = os.path.join(REPO, "scripts", "train_decoder.py")
sys.path.insert(0, os.path.join(REPO, "scripts"))
import workflows  # noqa: E402  (scripts/workflows.py)
RES = 64


def run_cli(comfy_dir: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN_SCRIPT, "--comfy", comfy_dir, "--cpu", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})


def test_cli_trains_a_decoder_that_the_sd15_example_decodes_with(host, comfy, comfy_dir, tiny_checkpoints, photos,
                                                                 lpips_files, tmp_path):
    from asuka_core.decoder import load_decoder

    name = unique("trained_decoder").replace("-", "_")
    run_dir = tmp_path / "run"
    proc = run_cli(comfy_dir, "--checkpoint", tiny_checkpoints[9],
                   "--decoder", os.path.join(host.models.folder, host.models.avq_decoder),
                   "--alexnet-weights", lpips_files[0], "--lpips-weights", lpips_files[1],
                   "--images", photos, "--out", str(run_dir), "--name", name, "--steps", "2", "--batch-size", "2",
                   "--grad-accum", "1", "--latent-aug-prob", "1", "--disc-start", "1", "--resolution", str(RES),
                   "--val-every", "1", "--save-every", "0", "--sample-every", "1", "--log-every", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "held-out reconstruction loss" in proc.stdout and " d " in proc.stdout and "done:" in proc.stdout, proc.stdout
    decoder_file = run_dir / f"{name}.safetensors"
    for f in (decoder_file, run_dir / "training_state.pt", run_dir / "loss.png",
              run_dir / "samples" / "step_000001.png", run_dir / "log.jsonl"):
        assert f.is_file(), f
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    decoder = load_decoder(str(decoder_file))
    assert (decoder.kind, decoder.latent_channels) == ("avq", 4)
    for k, v in decoder.state_dict().items():                      # the exported weights are the EMA
        assert torch.equal(v, state["ema"]["shadow"][k]), k
    logged = [json.loads(x) for x in open(run_dir / "log.jsonl")]
    assert [x["step"] for x in logged] == [1, 2] and logged[0]["d_loss"] is None and logged[1]["d_loss"] is not None

    # The file, as it is, in the committed SD1.5 example workflow.
    os.symlink(decoder_file, os.path.join(host.models.folder, decoder_file.name))
    with open(workflows.path("asuka_sd15_inpaint")) as f:
        prompt = workflows.to_api_prompt(json.load(f), comfy.object_info())
    size = 128
    picture, mask = make_picture(size, seed=14), box_mask(size)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = host.checkpoint
    by_type["LoadImage"]["image"] = comfy.upload_image(picture, mask)
    by_type["ASUKA_MAELoader"]["mae_name"] = host.models.mae
    by_type["ASUKA_AlignerLoader"]["aligner_name"] = host.models.sd15_aligner
    by_type["ASUKA_DecoderLoader"]["decoder_name"] = decoder_file.name
    by_type["KSampler"]["steps"] = 2
    by_type["SaveImage"]["filename_prefix"] = unique("decoder-trained")
    result = comfy.run(prompt, timeout=600)
    assert result.ok, result.describe()
    out = comfy.image(result, next(k for k, v in prompt.items() if v["class_type"] == "SaveImage"))
    assert out.shape == (size, size, 3)
    keep = mask == 0
    assert np.abs(out[keep].astype(int) - picture[keep].astype(int)).max() <= 1
    assert np.abs(out[~keep].astype(int) - picture[~keep].astype(int)).mean() > 1   # the hole was decoded


def test_cli_refuses_bad_inputs_before_training(host, comfy_dir, tiny_checkpoints, photos, tmp_path):
    common = ["--images", photos, "--steps", "2", "--batch-size", "1", "--resolution", str(RES), "--lpips-weight", "0"]
    avq = os.path.join(host.models.folder, host.models.avq_decoder)
    cases = {
        "plain": (["--checkpoint", tiny_checkpoints[4], "--decoder", avq], ("non-inpainting", "latent_aug_prob")),
        "flux": (["--checkpoint", tiny_checkpoints[9], "--decoder",
                  os.path.join(host.models.folder, host.models.asuka_decoder)], ("16-channel", "4-channel SD1.5")),
        "lpips": (["--checkpoint", tiny_checkpoints[9], "--decoder", avq, "--lpips-weight", "1"],
                  ("LPIPS", "nothing is downloaded")),
    }
    for label, (args, words) in cases.items():
        run_dir = tmp_path / label
        proc = run_cli(comfy_dir, *common, *args, "--out", str(run_dir))
        assert proc.returncode == 2, label + proc.stdout + proc.stderr
        for w in words:
            assert w in proc.stderr, (label, proc.stderr)
        assert not (run_dir / "training_state.pt").exists()


def test_train_decoder_example_trains_from_the_vae_and_decodes_in_the_same_prompt(host, comfy, tiny_checkpoints,
                                                                                  photos, lpips_files):
    """The committed decoder-training example, converted as the Queue button does, with the
    tiny checkpoint, 2 steps at 64 px, started from the checkpoint's own VAE decoder (a new
    condition branch) with LPIPS and the GAN on: the node trains under ComfyUI's inference
    mode and its decoder decodes the SD1.5 graph's sample in the same prompt."""
    with open(workflows.path("asuka_sd15_train_decoder")) as f:
        prompt = workflows.to_api_prompt(json.load(f), comfy.object_info())
    picture, mask = make_picture(RES, seed=15), box_mask(RES)
    run_name = unique("decoder_node_run").replace("-", "_")
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = os.path.basename(tiny_checkpoints[9])
    by_type["LoadImage"]["image"] = comfy.upload_image(picture, mask)
    by_type["ASUKA_MAELoader"]["mae_name"] = host.models.mae
    by_type["ASUKA_AlignerLoader"]["aligner_name"] = host.models.sd15_aligner
    by_type["KSampler"]["steps"] = 2
    by_type["SaveImage"]["filename_prefix"] = unique("node-decoder")
    train = by_type["ASUKA_TrainDecoder"]
    assert train["start_decoder"] == "asymmetric-autoencoder-kl-x-1-5.safetensors" and train["resume"] is False
    train.update(start_decoder="vae", images_folder=_upload_photos(comfy, photos), lpips_weights=lpips_files[1],
                 alexnet_weights=lpips_files[0], steps=2, batch_size=1, grad_accum=1, lpips_weight=0.5,
                 disc_start=1, resolution=RES, run_name=run_name, save_to_models=False)
    result = comfy.run(prompt, timeout=900)
    assert result.ok, result.describe()
    out = comfy.image(result, next(k for k, v in prompt.items() if v["class_type"] == "SaveImage"))
    assert out.shape == (RES, RES, 3)
    keep = mask == 0
    assert np.abs(out[keep].astype(int) - picture[keep].astype(int)).max() <= 1     # composite kept the rest
    run_dir = os.path.join(comfy.output_dir, "asuka_training", run_name)
    state = torch.load(os.path.join(run_dir, "training_state.pt"), weights_only=True)
    assert state["step"] == 2
    assert any(k.startswith("condition_encoder.") for k in state["decoder"])
    from asuka_core.decoder import load_decoder

    trained = load_decoder(os.path.join(run_dir, run_name + ".safetensors"))
    assert trained.kind == "avq"


def test_cancel_stops_decoder_training_with_a_resumable_state(host, comfy, tiny_checkpoints, photos):
    run_name = unique("decoder_cancelled").replace("-", "_")
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", _id="ckpt", ckpt_name=os.path.basename(tiny_checkpoints[9]))
    train = g.add("ASUKA_TrainDecoder", _id="train", model=ckpt[0], vae=ckpt[2],
                  start_decoder=host.models.avq_decoder, images_folder=_upload_photos(comfy, photos),
                  lpips_weights="", alexnet_weights="", steps=100_000, batch_size=1, grad_accum=1,
                  learning_rate=8e-5, l1_weight=1.0, lpips_weight=0.0, disc_start=0, latent_aug_prob=0.5,
                  resolution=RES, precision="auto", run_name=run_name, resume=False, seed=0, save_to_models=False)
    g.add("SaveImage", _id="curve", images=train[1], filename_prefix=unique("decoder-curve"))
    run_dir = os.path.join(comfy.output_dir, "asuka_training", run_name)
    pid, body = comfy.queue(g.prompt())
    assert pid, body
    t0 = time.time()
    while not os.path.isfile(os.path.join(run_dir, "log.jsonl")):      # first step done
        assert time.time() - t0 < 300, "training never started:\n" + comfy.log_tail()
        time.sleep(0.5)
    t_int = time.time()
    comfy.interrupt()
    res = comfy.wait(pid, timeout=300)
    assert res.status == "error" and res.interrupted, res.describe()
    assert time.time() - t_int < 60
    state = torch.load(os.path.join(run_dir, "training_state.pt"), weights_only=True)
    assert 1 <= state["step"] < 100_000
