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
