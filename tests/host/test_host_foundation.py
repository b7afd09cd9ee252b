"""Foundation, through a real ComfyUI server: the pack imports cleanly, registers its nodes
with documentation, serves its web files and example workflows, runs a prompt, and reports
a node error as an execution error without taking the server down."""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import pytest

from tests.host.comfy_client import PACK_NAME, PACK_NODES, REPO, Graph, box_mask, make_picture, unique

pytestmark = pytest.mark.host


def _input_specs(info: dict) -> dict[str, list]:
    specs = {}
    for section in ("required", "optional"):
        specs.update(info.get("input", {}).get(section, {}) or {})
    return specs


def test_pack_imports_without_errors(host):
    log = host.client.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line]
    ours = [line for line in failed if PACK_NAME in line or "asuka_test_probe" in line]
    assert not ours, f"the pack failed to import:\n{host.client.log_tail(200)}"
    assert "Cannot import" not in "\n".join(line for line in log.splitlines() if PACK_NAME in line), log[-5000:]
    info = host.client.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{host.client.log_tail(200)}"
    assert "ASUKATest_RecordCrossAttention" in info, "the test probe pack did not load"


def _documentation_problems(node_id: str, info: dict) -> list[str]:
    problems = []
    if not info.get("display_name") or info["display_name"] == node_id:
        problems.append("no display name")
    if not info.get("category", "").startswith("inpaint"):
        problems.append(f"category {info.get('category')!r} is not under inpaint/")
    if len(info.get("description", "")) < 40:
        problems.append(f"description too short: {info.get('description')!r}")
    specs = _input_specs(info)
    for name, spec in specs.items():
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if not opts.get("tooltip"):
            problems.append(f"input {name} has no tooltip")
    tooltips = info.get("output_tooltips") or []
    if len(tooltips) != len(info["output"]) or not all(tooltips):
        problems.append(f"outputs lack tooltips: {tooltips}")
    return problems


@pytest.mark.parametrize("node_id", PACK_NODES)
def test_node_is_documented(comfy, node_id):
    info = comfy.object_info(node_id)
    assert info["name"] == node_id
    assert _input_specs(info), f"{node_id} has no inputs"
    assert not _documentation_problems(node_id, info), _documentation_problems(node_id, info)


def test_every_pack_node_is_documented(comfy):
    """Also the nodes added after this test was written: everything the pack registers."""
    info = comfy.object_info()
    ours = {k: v for k, v in info.items() if PACK_NAME in str(v.get("python_module", "")) or k.startswith("ASUKA_")}
    assert set(PACK_NODES) <= set(ours), sorted(ours)
    problems = {k: p for k, v in ours.items() if (p := _documentation_problems(k, v))}
    assert not problems, problems


def test_loader_combos_list_the_model_folder(comfy, host):
    for node_id, field in (("ASUKA_MAELoader", "mae_name"), ("ASUKA_AlignerLoader", "aligner_name"),
                           ("ASUKA_DecoderLoader", "decoder_name")):
        spec = _input_specs(comfy.object_info(node_id))[field]
        options = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
        for name in (host.models.mae, host.models.sd15_aligner, host.models.avq_decoder,
                     host.models.asuka_decoder):
            assert name in options, f"{node_id}.{field} does not list {name}: {options}"


def test_widget_defaults_match_the_spec(comfy):
    strength = _input_specs(comfy.object_info("ASUKA_AlignerConditioning"))["strength"]
    assert strength[0] == "FLOAT" and strength[1]["default"] == 1.0
    specs = _input_specs(comfy.object_info("ASUKA_MaskedDecode"))
    assert specs["composite"][0] == "BOOLEAN" and specs["composite"][1]["default"] is True
    assert specs["tile_size"][0] == "INT" and specs["tile_size"][1]["default"] == 0
    assert specs["tile_overlap"][0] == "INT"


def test_web_files_are_served(comfy):
    web = os.path.join(REPO, "web")
    js = sorted(os.path.relpath(p, web) for p in glob.glob(os.path.join(web, "**", "*.js"), recursive=True))
    docs = sorted(glob.glob(os.path.join(web, "docs", "*.md")))
    if not js and not docs:
        pytest.skip("the pack has no web files")
    listed = comfy.get_json("/extensions")
    for rel in js:
        url = f"/extensions/{PACK_NAME}/{rel}"
        assert url in listed, f"{url} not in /extensions"
        r = comfy.get(url)
        assert r.status_code == 200 and "javascript" in r.headers.get("Content-Type", ""), (url, r.status_code)
    for path in docs:
        url = f"/extensions/{PACK_NAME}/docs/{os.path.basename(path)}"
        r = comfy.get(url)
        assert r.status_code == 200, f"{url}: HTTP {r.status_code}"
        with open(path, encoding="utf-8") as f:
            assert r.text == f.read()
    # The help panel looks up web/docs/<node_id>.md: every documented node id must exist.
    known = set(comfy.object_info())
    for path in docs:
        node_id = os.path.splitext(os.path.basename(path))[0]
        assert node_id in known, f"web/docs/{node_id}.md documents a node that does not exist"


def test_example_workflows_are_listed(comfy):
    folder = os.path.join(REPO, "example_workflows")
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(folder, "*.json")))
    if not names:
        pytest.skip("example_workflows/ has no workflows yet")
    templates = comfy.get_json("/api/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == names, templates
    for name in names:
        r = comfy.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert r.status_code == 200, (name, r.status_code)
        workflow = r.json()
        used = {n.get("type") for n in workflow.get("nodes", [])}
        unknown = {t for t in used if t and t.startswith("ASUKA_")} - set(PACK_NODES)
        assert not unknown, f"{name} uses unknown pack nodes {unknown}"


def mae_prior_graph(host, image_name: str, prefix: str, mae: str | None = None) -> Graph:
    g = Graph()
    load = g.add("LoadImage", image=image_name)
    mae_node = g.add("ASUKA_MAELoader", mae_name=mae or host.models.mae)
    prior = g.add("ASUKA_MAEPrior", mae=mae_node[0], image=load[0], mask=load[1])
    g.add("SaveImage", _id="save", images=prior[1], filename_prefix=prefix)
    return g


def test_prompt_through_pack_nodes_succeeds(comfy, host):
    h, w = 192, 320  # not square, not 256: the reconstruction must come back at the input size
    name = comfy.upload_image(make_picture((h, w), seed=1), box_mask((h, w)))
    res = comfy.run(mae_prior_graph(host, name, unique("foundation")).prompt(), timeout=300)
    assert res.ok, res.describe()
    img = comfy.image(res, "save")
    assert img.shape == (h, w, 3)
    assert img.std() > 0, "the reconstruction is a flat colour"


def test_node_error_is_reported_and_server_keeps_running(comfy, host):
    picture = make_picture(256, seed=2)
    empty = comfy.upload_image(picture, np.zeros((256, 256), np.float32))
    res = comfy.run(mae_prior_graph(host, empty, unique("empty-mask")).prompt(), timeout=300)
    assert res.status == "error", res.describe()
    node_id, node_type = res.error_node
    assert node_type == "ASUKA_MAEPrior", res.describe()
    assert re.search(r"empty|nothing to inpaint", res.message, re.I), res.message
    assert re.search(r"mask", res.message, re.I), res.message
    assert "Traceback" not in res.message

    good = comfy.upload_image(picture, box_mask(256))
    res2 = comfy.run(mae_prior_graph(host, good, unique("after-error")).prompt(), timeout=300)
    assert res2.ok, res2.describe()
    assert comfy.alive()


def test_scripts_folder_shadows_no_comfyui_module(comfy_dir):
    """Scripts and tests put ``scripts/`` first on ``sys.path``; a file there named like one of
    ComfyUI's top-level modules or packages (``comfy_api``, ``nodes``, ``utils`` …) would
    replace it in that process and break every in-process ComfyUI import."""
    comfy_top = {os.path.splitext(n)[0] for n in os.listdir(comfy_dir)
                 if n.endswith(".py") or os.path.isfile(os.path.join(comfy_dir, n, "__init__.py"))
                 or (os.path.isdir(os.path.join(comfy_dir, n)) and not n.startswith("."))}
    ours = {os.path.splitext(n)[0] for n in os.listdir(os.path.join(REPO, "scripts")) if n.endswith(".py")}
    assert not ours & comfy_top, sorted(ours & comfy_top)
