"""``scripts/evaluate.py`` end to end against the real server: three real photos, generated
masks, the pack's SD1.5 example workflow (random-weight models, one sampler step) against
a damaged copy of it; the report's structure, its numbers re-derived from the files it
wrote, resuming, and the damaged workflow scoring worse where it should."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import skimage.data
from PIL import Image

from asuka_core import metrics

pytestmark = pytest.mark.host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import workflows  # noqa: E402  (scripts/workflows.py)

EVALUATE = os.path.join(REPO, "scripts", "evaluate.py")
PHOTOS = ("astronaut", "chelsea", "coffee")
WORKFLOWS = ("asuka_sd15", "no_composite", "colour_cast")


def _evaluate(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, EVALUATE, "--no-progress", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _example(host) -> dict:
    """The committed SD1.5 example (frontend format) with the test models and one step."""
    with open(workflows.path("asuka_sd15_inpaint")) as f:
        wf = json.load(f)
    names = {"CheckpointLoaderSimple": host.checkpoint, "ASUKA_MAELoader": host.models.mae,
             "ASUKA_AlignerLoader": host.models.sd15_aligner, "ASUKA_DecoderLoader": host.models.avq_decoder}
    for node in wf["nodes"]:
        if node["type"] in names:
            node["widgets_values"][0] = names[node["type"]]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 1          # seed, control, steps, ...
    return wf


@pytest.fixture(scope="module")
def report(host_server, tmp_path_factory):
    host = host_server
    base = tmp_path_factory.mktemp("evaluate")
    images = base / "images"
    images.mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(images / f"{name}.png")
    good = _example(host)
    (base / "asuka_sd15.json").write_text(json.dumps(good))
    # damaged: the same graph (API format) whose masked decode does not paste the original back
    api = workflows.to_api_prompt(good, host.client.object_info())
    for node in api.values():
        if node["class_type"] == "ASUKA_MaskedDecode":
            node["inputs"]["composite"] = False
    (base / "no_composite.json").write_text(json.dumps(api))
    # damaged: a green cast blended over the decoded picture (pasted back inside the hole)
    cast = json.loads(json.dumps(api))
    decode = next(k for k, v in cast.items() if v["class_type"] == "ASUKA_MaskedDecode")
    cast[decode]["inputs"]["composite"] = True
    cast["900"] = {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1,
                                                          "color": 0x00FF00}}
    cast["901"] = {"class_type": "ImageBlend", "inputs": {"image1": [decode, 0], "image2": ["900", 0],
                                                          "blend_factor": 0.4, "blend_mode": "normal"}}
    save = next(k for k, v in cast.items() if v["class_type"] == "SaveImage")
    cast[save]["inputs"]["images"] = ["901", 0]
    (base / "colour_cast.json").write_text(json.dumps(cast))
    out = base / "report"
    args = ["--server", host.client.base_url, "--workflow", str(base / "asuka_sd15.json"),
            "--workflow", str(base / "no_composite.json"), "--workflow", str(base / "colour_cast.json"), "--images", str(images), "--mask-generator",
            "--seed", "3", "--size", "128", "--out", str(out)]
    t0 = time.time()
    proc = _evaluate(*args)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr + host.client.log_tail()
    return {"out": out, "args": args, "proc": proc, "seconds": seconds, "host": host}


def _rows(out) -> list[dict]:
    with open(out / "per_image.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_report_structure(report):
    out = report["out"]
    rows = _rows(out)
    assert sorted((r["workflow"], r["image"]) for r in rows) == sorted(
        (w, p) for w in WORKFLOWS for p in PHOTOS)
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows), rows
    for r in rows:
        for m in metrics.METRICS:
            assert np.isfinite(float(r[m])), (m, r)
    for sub in ("inputs", "masks", *(f"results/{w}" for w in WORKFLOWS)):
        assert sorted(os.listdir(out / sub)) == sorted(f"{p}.png" for p in PHOTOS), sub
    for p in PHOTOS:
        hole = np.asarray(Image.open(out / "masks" / f"{p}.png")) > 0
        assert hole.shape == (128, 128) and 0.2 <= hole.mean() <= 0.8      # MISATO hole ratios

    md = (out / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 5, md                                          # header, rule, three workflows
    assert "PSNR (dB) ↑" in table[0] and "Grad ↓" in table[0] and "Unmasked ΔE2000 ↓" in table[0]
    assert [t.split("|")[1:3] for t in table[2:]] == [[f" {w} ", " 3 "] for w in WORKFLOWS]
    assert "95 % interval" in md and "never downloaded" in md
    html = (out / "summary.html").read_text()
    assert html.count("<tr>") == 1 + 3 and "contact_sheet.png" in html and "colour_cast" in html
    sheet = Image.open(out / "contact_sheet.png")
    # 5 columns (original, mask, three workflows) of 160 px tiles, 3 rows
    assert sheet.size == (5 * 164 + 4, 18 + 3 * (160 + 18 + 4) + 4)
    assert report["proc"].stdout.startswith("# Inpainting evaluation")


def test_report_numbers_rederive_from_its_files(report):
    """Each CSV value is the metric of the files the report saved; each summary mean is the
    mean of the CSV column."""
    out = report["out"]
    rows = _rows(out)
    for r in rows:
        truth = np.asarray(Image.open(out / "inputs" / f"{r['image']}.png"))
        mask = np.asarray(Image.open(out / "masks" / f"{r['image']}.png")) > 0
        result = np.asarray(Image.open(out / "results" / r["workflow"] / f"{r['image']}.png"))
        for m, v in metrics.score(result, truth, mask).items():
            assert float(r[m]) == pytest.approx(v, abs=2e-6), (m, r)
    md = (out / "summary.md").read_text()
    for wf in WORKFLOWS:
        vals = [float(r["psnr"]) for r in rows if r["workflow"] == wf]
        m, lo, hi = metrics.mean_interval(vals)
        assert f"| {wf} | 3 | {m:.2f} [{lo:.2f}, {hi:.2f}] |" in md


def test_damaged_workflow_scores_worse_on_unmasked_drift(report):
    """Without compositing, the decoder's colour drift lands outside the hole: the metric
    made for it must show it; the composited workflow keeps the original there (to
    8-bit rounding)."""
    rows = _rows(report["out"])
    drift = {wf: [float(r["unmasked_de2000"]) for r in rows if r["workflow"] == wf]
             for wf in ("asuka_sd15", "no_composite")}
    assert max(drift["asuka_sd15"]) < 0.5, drift
    assert min(drift["no_composite"]) > 2.0, drift
    # the pasted images are the same, so every other metric agrees between the two
    by = {(r["workflow"], r["image"]): r for r in rows}
    for p in PHOTOS:
        for m in ("psnr", "ssim", "grad", "seam"):
            assert float(by[("asuka_sd15", p)][m]) == pytest.approx(float(by[("no_composite", p)][m]), abs=0.05)


def test_colour_cast_scores_worse_on_the_seam(report):
    """A cast over the fill moves the colour step across the hole's border: seam must rise
    on every photo (PSNR falls too; the pasted result of the untouched workflow is the
    reference)."""
    by = {(r["workflow"], r["image"]): r for r in _rows(report["out"])}
    for p in PHOTOS:
        good, cast = by[("asuka_sd15", p)], by[("colour_cast", p)]
        assert float(cast["seam"]) > float(good["seam"]) + 5.0, (p, good["seam"], cast["seam"])


def test_rerun_resumes_and_only_redoes_missing_pairs(report):
    out = report["out"]
    rows = _rows(out)
    # a re-run with everything scored runs nothing
    proc = _evaluate(*report["args"])
    assert proc.returncode == 0, proc.stderr
    assert "resuming: 9 pairs already scored" in proc.stderr
    assert _rows(out) == rows
    # drop one pair: only that one runs again, and gets the same numbers (fixed seed)
    kept = [r for r in rows if not (r["workflow"] == "asuka_sd15" and r["image"] == "coffee")]
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    proc = _evaluate(*report["args"])
    assert proc.returncode == 0, proc.stderr
    assert "resuming: 8 pairs already scored" in proc.stderr
    again = {(r["workflow"], r["image"]): r for r in _rows(out)}
    old = {(r["workflow"], r["image"]): r for r in rows}
    assert set(again) == set(old)
    for m in metrics.METRICS:
        assert float(again[("asuka_sd15", "coffee")][m]) == pytest.approx(float(old[("asuka_sd15", "coffee")][m]),
                                                                          abs=1e-4)


def test_bad_inputs_get_clear_messages(report, tmp_path):
    host = report["host"]
    two_saves = workflows.to_api_prompt(_example(host), host.client.object_info())
    two_saves["99"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "x"}}
    (tmp_path / "two.json").write_text(json.dumps(two_saves))
    images = report["out"] / "inputs"
    proc = _evaluate("--server", host.client.base_url, "--workflow", str(tmp_path / "two.json"),
                     "--images", str(images), "--mask-generator", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "name the one to score" in proc.stderr and "#<node id>" in proc.stderr
    (tmp_path / "masks").mkdir()
    proc = _evaluate("--server", host.client.base_url, "--workflow", str(tmp_path / "two.json") + "#99",
                     "--images", str(images), "--masks", str(tmp_path / "masks"), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "no mask for image 'astronaut'" in proc.stderr
