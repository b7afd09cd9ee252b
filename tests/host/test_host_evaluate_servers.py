"""``scripts/evaluate.py`` spread over two real ComfyUI CPU servers: the report equals the
one-server report, a server killed in the middle of the run loses nothing (its pair in
flight is retried on the other), and a re-run resumes whatever server scored the pairs.

The workflow uses ComfyUI's own image nodes only (no models), slowed by a large blur so
that a pair takes a second or so and the kill lands mid-run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import skimage.data
from PIL import Image

pytestmark = pytest.mark.host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import evaluate  # noqa: E402  (scripts/evaluate.py)

EVALUATE = os.path.join(REPO, "scripts", "evaluate.py")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field")
# LoadImage -> 2x up (lanczos) -> blur (radius 15) -> back down -> SaveImage
PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
    "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "lanczos", "scale_by": 2.0}},
    "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 15, "sigma": 4.0}},
    "4": {"class_type": "ImageScaleBy", "inputs": {"image": ["3", 0], "upscale_method": "area", "scale_by": 0.5}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}},
}


@pytest.fixture(scope="module")
def servers(comfy_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("eval-servers")
    started = []
    try:
        for name in ("a", "b"):
            d = {k: base / name / k for k in ("input", "output", "temp", "user")}
            for v in d.values():
                v.mkdir(parents=True)
            extra = ["--database-url", "sqlite:///:memory:", *[x for k, v in d.items()
                                                                for x in (f"--{k}-directory", str(v))]]
            started.append(evaluate.LocalServer(comfy_dir, str(base / f"{name}.log"), extra))
        yield started
    finally:
        for s in started:
            s.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval-inputs")
    (base / "images").mkdir()
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.save(base / "images" / f"{name}.png")
    (base / "blur.json").write_text(json.dumps(PROMPT))
    return base


def _args(inputs, out, *urls):
    return ["--workflow", str(inputs / "blur.json"), "--images", str(inputs / "images"), "--mask-generator",
            "--seed", "2", "--size", "96", "--out", str(out), *[x for u in urls for x in ("--server", u)]]


def _evaluate(args, timeout=600):
    return subprocess.run([sys.executable, EVALUATE, "--no-progress", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _rows(out):
    """The CSV without the timing column, and the summary without its time stamp."""
    with open(out / "per_image.csv", newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    summary = [line for line in (out / "summary.md").read_text().splitlines() if not line.startswith("- written")]
    return rows, summary


@pytest.fixture(scope="module")
def one_server(servers, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "report"
    proc = _evaluate(_args(inputs, out, servers[0].url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows, summary = _rows(out)
    assert len(rows) == len(PHOTOS) and all(r["status"] == "ok" for r in rows)
    return out, rows, summary


def test_two_servers_give_the_one_server_report(servers, inputs, one_server, tmp_path):
    out = tmp_path / "report"
    t0 = time.time()
    proc = _evaluate(_args(inputs, out, servers[0].url, servers[1].url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"spreading {len(PHOTOS)} pairs over 2 servers" in proc.stderr
    print(f"two servers: {time.time() - t0:.1f} s for {len(PHOTOS)} pairs", file=sys.stderr)
    rows, summary = _rows(out)
    assert (rows, summary) == one_server[1:]
    for p in PHOTOS:
        assert (out / "results" / "blur" / f"{p}.png").read_bytes() == \
            (one_server[0] / "results" / "blur" / f"{p}.png").read_bytes()


def test_a_server_killed_mid_run_loses_nothing(servers, inputs, one_server, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, EVALUATE, "--no-progress",
                             *_args(inputs, out, servers[0].url, servers[1].url)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv_path = out / "per_image.csv"
    killed_after = None
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if csv_path.exists():
            with open(csv_path, newline="") as f:
                n = len(list(csv.DictReader(f)))
            if n >= 1:
                os.killpg(servers[1].proc.pid, signal.SIGKILL)
                servers[1].proc.wait()
                killed_after = n
                break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed_after is not None and killed_after < len(PHOTOS), "the run ended before the kill"
    assert proc.returncode == 0, stdout + stderr
    assert "stopped answering" in stderr and "1 server(s) left" in stderr
    rows, summary = _rows(out)
    assert (rows, summary) == one_server[1:]
    # the re-run on the surviving server resumes every pair, whichever server scored it
    again = _evaluate(_args(inputs, out, servers[0].url))
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(PHOTOS)} pairs already scored" in again.stderr
    assert _rows(out) == (rows, summary)


def test_misato_protocol_end_to_end(servers, inputs, tmp_path):
    """Grey masks kept as given, Grad blended by them, 3-decimal summary, FID from the
    Inception file passed, IDS explained when there are fewer pairs than the PCA needs, the
    CLIP column from the CLIP folder passed."""
    import numpy as np
    import torch
    import torchvision

    from asuka_core import metrics

    masks = tmp_path / "masks"
    masks.mkdir()
    for k, name in enumerate(PHOTOS):
        m = np.zeros((96, 96), np.uint8)
        m[20 + k:70, 15:60 + k] = 255
        m[20 + k:70, 60 + k:64 + k] = 90 + 20 * k          # an anti-aliased band of grey
        Image.fromarray(m).save(masks / f"{name}.png")
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    import transformers             # ComfyUI's requirement: a small random CLIP vision model in its format
    transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=32, projection_dim=24, hidden_act="quick_gelu")).save_pretrained(tmp_path / "clip")
    out = tmp_path / "report"
    proc = _evaluate(["--protocol", "misato", "--size", "96", "--workflow", str(inputs / "blur.json"),
                      "--images", str(inputs / "images"), "--masks", str(masks), "--out", str(out),
                      "--inception-weights", str(tmp_path / "inception.pth"), "--clip-weights", str(tmp_path / "clip"),
                      "--server", servers[0].url])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(PHOTOS)
    for r in rows:
        grey = np.asarray(Image.open(out / "masks" / f"{r['image']}.png"))
        assert grey.dtype == np.uint8 and len(np.unique(grey)) == 3          # kept as given
        truth = np.asarray(Image.open(out / "inputs" / f"{r['image']}.png"))
        result = np.asarray(Image.open(out / "results" / "blur" / f"{r['image']}.png"))
        assert float(r["grad"]) == pytest.approx(metrics.grad(result, truth, grey, soft=True), abs=2e-6)
        assert abs(float(r["grad"]) - metrics.grad(result, truth, grey)) > 1e-3       # not the binarised one
        assert float(r["psnr"]) == pytest.approx(metrics.psnr(result, truth, grey), abs=2e-6)
    md = (out / "summary.md").read_text()
    assert "Protocol: MISATO" in md and "FID ↓" in md
    assert "U-IDS/P-IDS not computed: the MISATO protocol reduces the features to 96 dimensions" in md
    table = [line for line in md.splitlines() if line.startswith("| blur")]
    m, lo, hi = metrics.mean_interval([float(r["psnr"]) for r in rows])
    assert f"| blur | {len(PHOTOS)} | {m:.3f} [{lo:.3f}, {hi:.3f}] |" in table[0]
    # the CLIP column, re-derived from the files the report wrote (grey masks as given)
    from evaluate_learned import LearnedMetrics

    names = [r["image"] for r in rows]
    clip = LearnedMetrics(clip=str(tmp_path / "clip")).clip_score(
        [np.asarray(Image.open(out / "inputs" / f"{n}.png")) for n in names],
        [np.asarray(Image.open(out / "results" / "blur" / f"{n}.png")) for n in names],
        [np.asarray(Image.open(out / "masks" / f"{n}.png")) for n in names])
    assert "CLIP ↑" in md and table[0].rstrip(" |").endswith(f"| {round(clip, 3):.3f}")
