"""The committed example workflows are what the live nodes produce, they run, and the real
frontend loads them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.host.comfy_client import box_mask, make_picture, unique

pytestmark = pytest.mark.host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import workflows  # noqa: E402  (scripts/workflows.py)

FRONTEND = os.path.join(REPO, "tests", "frontend")


def committed(name: str) -> dict:
    return workflows.load(name)


# ComfyUI 0.33.0 declares an IMAGE output on these (0.3.75: none); the committed files have
# none, and the frontend loads them either way (test_real_frontend_loads_example).
OUTPUT_GAINED_IMAGE = ("SaveImage", "PreviewImage")


def _without_unlinked_gained_outputs(workflow: dict) -> dict:
    nodes = [{**node, "outputs": [o for o in node.get("outputs", []) if o.get("links")]}
             if node["type"] in OUTPUT_GAINED_IMAGE else node for node in workflow["nodes"]]
    return {**workflow, "nodes": nodes}


@pytest.mark.parametrize("name", sorted(workflows.WORKFLOWS))
def test_committed_workflow_matches_live_nodes(comfy, name):
    """Regenerating from the server's /object_info gives the committed file: input names,
    widget order and defaults of every node in the example are current."""
    fresh = _without_unlinked_gained_outputs(workflows.render_all(comfy.object_info())[name])
    assert fresh == _without_unlinked_gained_outputs(committed(name)), (
        f"example_workflows/{name}.json is stale: run `scripts/host.sh python scripts/workflows.py "
        "--server <url>` against a server with the pack loaded")
    assert os.path.isfile(workflows.path(name, ".jpg")), "thumbnail missing"


def test_sd15_example_runs(host, comfy):
    """The example, converted as the frontend's Queue button does, runs with the test models
    (random weights) after swapping in their file names and a short schedule."""
    info = comfy.object_info()
    prompt = workflows.to_api_prompt(committed("asuka_sd15_inpaint"), info)
    image = comfy.upload_image(make_picture(256, seed=11), box_mask(256))
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = host.checkpoint
    by_type["LoadImage"]["image"] = image
    by_type["ASUKA_MAELoader"]["mae_name"] = host.models.mae
    by_type["ASUKA_AlignerLoader"]["aligner_name"] = host.models.sd15_aligner
    by_type["ASUKA_DecoderLoader"]["decoder_name"] = host.models.avq_decoder
    by_type["KSampler"]["steps"] = 2
    by_type["SaveImage"]["filename_prefix"] = unique("example")
    assert by_type["KSampler"]["cfg"] == 1.0, "the example must use cfg 1.0 (ASUKA runs without CFG)"

    result = comfy.run(prompt)
    assert result.ok, result.describe()
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    out = comfy.image(result, save_id)
    assert out.shape == (256, 256, 3)
    keep = box_mask(256) == 0
    assert np.abs(out[keep].astype(int) - make_picture(256, seed=11)[keep].astype(int)).max() <= 1


def _frontend_ready() -> str | None:
    if not os.path.isdir(os.path.join(FRONTEND, "node_modules", "playwright-core")):
        return "playwright-core is not installed (scripts/host.sh installs it when npm exists)"
    if not shutil.which(os.environ.get("CHROMIUM", "chromium")):
        return "no Chromium on this machine (.ci/run installs Debian's chromium)"
    if not shutil.which("node"):
        return "no node on this machine"
    return None


@pytest.mark.parametrize("name", sorted(workflows.WORKFLOWS))
def test_real_frontend_loads_example(host, name):
    """ComfyUI's own frontend (the one the host pins: 1.32.9 on ComfyUI 0.3.75, 1.48.7 on
    0.33.0; headless Chromium) loads the workflow and knows every node type in it."""
    reason = _frontend_ready()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["node", "load_workflow.mjs", host.client.base_url, workflows.path(name)], cwd=FRONTEND,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["missing"] == [], report
    assert report["nodes"] == len(committed(name)["nodes"])
    make, _ = workflows.WORKFLOWS[name]
    assert {node.type for node in make().values()} <= set(report["types"])
    assert not report["errors"], report["errors"]
