"""Parts of scripts/evaluate.py that need no server: how a workflow is patched per pair,
how images and masks are fitted, and the errors a user gets for bad inputs."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import evaluate  # noqa: E402  (scripts/evaluate.py)

PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
    "2": {"class_type": "LoadImageMask", "inputs": {"image": "b.png", "channel": "red"}},
    "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "y"}},
}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_workflow_is_patched_per_pair(tmp_path):
    path = _write(tmp_path, "wf.json", PROMPT)
    wf = evaluate.Workflow(path + "#4", {}, set())
    assert wf.output == "4" and wf.name == "wf"
    p = wf.for_pair("asuka-eval/cat-123.png", "asuka-eval/wf/cat-tok")
    assert p["1"]["inputs"]["image"] == "asuka-eval/cat-123.png"
    assert p["2"]["inputs"] == {"image": "asuka-eval/cat-123.png", "channel": "alpha"}   # LoadImage's mask
    assert p["4"]["inputs"]["filename_prefix"] == "asuka-eval/wf/cat-tok-4"
    assert p["3"] == PROMPT["3"]
    assert PROMPT["1"]["inputs"]["image"] == "a.png"            # the loaded workflow is not modified
    # the same file twice gets two names; another SaveImage id, another sha (resume key)
    other = evaluate.Workflow(path + "#5", {}, {"wf"})
    assert other.name == "wf-2" and other.sha != wf.sha


def test_workflow_errors_say_what_to_do(tmp_path):
    path = _write(tmp_path, "two.json", PROMPT)
    with pytest.raises(evaluate.EvalError, match=r"2 SaveImage nodes; name the one to score: .*two.json#<node id>"):
        evaluate.Workflow(path, {}, set())
    with pytest.raises(evaluate.EvalError, match="no node with id 9"):
        evaluate.Workflow(path + "#9", {}, set())
    no_load = {k: v for k, v in PROMPT.items() if v["class_type"] != "LoadImage"}
    with pytest.raises(evaluate.EvalError, match="no LoadImage node"):
        evaluate.Workflow(_write(tmp_path, "n.json", no_load), {}, set())
    ui = {"nodes": [{"type": "MysteryNode", "id": 1, "inputs": []}], "links": []}
    with pytest.raises(evaluate.EvalError, match=r"does not know the node types \['MysteryNode'\]"):
        evaluate.Workflow(_write(tmp_path, "ui.json", ui), {}, set())
    with pytest.raises(evaluate.EvalError, match="no such file"):
        evaluate.Workflow(str(tmp_path / "missing.json"), {}, set())


def test_images_and_masks_are_fitted_alike(tmp_path):
    img = np.zeros((60, 100, 3), np.uint8)
    img[:, 20:80] = 200                                  # the centre square after cropping
    Image.fromarray(img).save(tmp_path / "p.png")
    mask = np.zeros((60, 100), np.uint8)
    mask[10:30, 40:60] = 255
    (tmp_path / "m").mkdir()
    Image.fromarray(mask).save(tmp_path / "m" / "p.png")
    fitted = evaluate.load_image(str(tmp_path / "p.png"), 120)
    assert fitted.shape == (120, 120, 3) and fitted.min() == 200
    m = evaluate.load_mask(str(tmp_path / "m"), "p", 120, (120, 120))
    assert m.dtype == bool and m.shape == (120, 120)
    assert m.sum() == 40 * 40 and m[20:60, 40:80].all()     # 20x20 px, doubled, shifted by the crop
    with pytest.raises(evaluate.EvalError, match="too small"):
        evaluate.load_image(str(tmp_path / "p.png"), 0)  # 56 px high once cropped to a multiple of 8
    Image.fromarray(np.zeros((70, 101, 3), np.uint8)).save(tmp_path / "q.png")
    assert evaluate.load_image(str(tmp_path / "q.png"), 0).shape == (64, 96, 3)


def test_mask_problems_are_explained(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(evaluate.EvalError, match="no mask for image 'p'"):
        evaluate.load_mask(str(tmp_path / "m"), "p", 64, (64, 64))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "m" / "p.png")
    with pytest.raises(evaluate.EvalError, match="empty"):
        evaluate.load_mask(str(tmp_path / "m"), "p", 64, (64, 64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluate.EvalError, match="no images"):
        evaluate.list_images(str(tmp_path / "empty"))
    with pytest.raises(evaluate.EvalError, match="not a folder"):
        evaluate.list_images(str(tmp_path / "nowhere"))


class _FakeServer:
    """A stand-in for one ComfyUI: runs a job in ``delay`` s; ``die_after`` jobs started, it
    is down (the job in flight and every later one raise ServerDown); ``refuses``: job names
    it fails (a node error on that server only)."""

    def __init__(self, name, delay=0.01, die_after=None, refuses=()):
        self.base_url, self.delay, self.die_after, self.refuses = name, delay, die_after, set(refuses)
        self.started, self.done = [], []

    def attempt(self, job):
        import time

        self.started.append(job)
        time.sleep(self.delay)
        if self.die_after is not None and len(self.started) > self.die_after:
            raise evaluate.ServerDown("connection refused")
        if job in self.refuses:
            return {"status": "failed", "error": f"{job} failed on {self.base_url}"}
        self.done.append(job)
        return {"status": "ok", "by": self.base_url}


def _dispatch(jobs, servers):
    recorded = {}

    def record(job, row):
        assert job not in recorded, f"{job} recorded twice"
        recorded[job] = row

    evaluate.dispatch(jobs, servers, lambda s, j: s.attempt(j), record)
    return recorded


def test_dispatch_spreads_jobs_and_survives_a_dead_server():
    jobs = [f"p{i}" for i in range(20)]
    a, b = _FakeServer("a"), _FakeServer("b")
    rec = _dispatch(jobs, [a, b])
    assert set(rec) == set(jobs) and all(r["status"] == "ok" for r in rec.values())
    assert a.done and b.done and len(a.done) + len(b.done) == 20          # both worked, nothing twice
    # b dies after 3 jobs: its job in flight and the rest go to a; nothing is lost
    a, b = _FakeServer("a"), _FakeServer("b", die_after=3)
    rec = _dispatch(jobs, [a, b])
    assert set(rec) == set(jobs) and all(r["status"] == "ok" for r in rec.values())
    assert len(b.done) == 3 and len(a.done) == 17


def test_dispatch_retries_a_failure_on_another_server_then_records_it():
    jobs = ["x", "y", "z"]
    a, b = _FakeServer("a", refuses={"x"}), _FakeServer("b", refuses={"y", "x"})
    rec = _dispatch(jobs, [a, b])
    assert rec["y"]["status"] == "ok" and rec["y"]["by"] == "a"               # failed on b, ran on a
    assert rec["x"]["status"] == "failed" and "failed on" in rec["x"]["error"]  # failed on both
    assert rec["z"]["status"] == "ok"
    assert a.started.count("x") == 1 and b.started.count("x") == 1
    # one server: a failure is recorded at once; every server down: every job recorded failed
    rec = _dispatch(jobs, [_FakeServer("a", refuses={"z"})])
    assert rec["z"]["status"] == "failed" and rec["x"]["status"] == "ok"
    rec = _dispatch(jobs, [_FakeServer("a", die_after=0), _FakeServer("b", die_after=1)])
    assert set(rec) == set(jobs) and sum(r["status"] == "ok" for r in rec.values()) == 1
    assert all("stopped answering" in r["error"] for r in rec.values() if r["status"] != "ok")


def test_misato_masks_keep_their_grey_levels_and_the_1k_names(tmp_path):
    (tmp_path / "m").mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 10:40] = 255
    mask[10:40, 40] = 100                       # an anti-aliased edge column
    Image.fromarray(mask).save(tmp_path / "m" / "00p.png")   # the 1K set names its masks 00<name>
    grey = evaluate.load_mask(str(tmp_path / "m"), "p", 0, (64, 64), grey=True)
    assert grey.dtype == np.uint8 and (grey == mask).all()
    assert (evaluate.load_mask(str(tmp_path / "m"), "p", 0, (64, 64)) == (mask >= 128)).all()
    args = evaluate.parse_args(["--workflow", "w.json", "--images", "i", "--masks", "m", "--protocol", "misato",
                                "--server", "http://a:1", "--server", "http://b:2"])
    assert args.size == 0 and args.server == ["http://a:1", "http://b:2"]
    assert evaluate.parse_args(["--workflow", "w.json", "--images", "i", "--mask-generator"]).size == 512
    assert evaluate._fmt(0.36849, "lpips", "misato") == "0.368" and evaluate._fmt(11.4649, "FID", "misato") == "11.465"


def test_clip_score_belongs_to_the_misato_protocol_and_says_when_skipped(capsys):
    base = ["--workflow", "w.json", "--images", "i", "--masks", "m"]
    with pytest.raises(SystemExit):
        evaluate.parse_args(base + ["--clip-weights", "clip-vit-large-patch14"])
    assert "--protocol misato" in capsys.readouterr().err
    args = evaluate.parse_args(base + ["--protocol", "misato", "--clip-weights", "clip-vit-large-patch14"])
    assert args.clip_weights == "clip-vit-large-patch14"
    skipped = evaluate.clip_note(None)
    assert "not computed" in skipped and "--clip-weights" in skipped and "never downloaded" in skipped
    assert "not computed" not in evaluate.clip_note("models/clip-vit-large-patch14/")
