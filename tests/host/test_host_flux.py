"""ASUKA on FLUX.1-Fill through a real ComfyUI server: the whole graph (MAE prior -> both
FLUX aligners -> ASUKA_FluxConditioning -> InpaintModelConditioning -> KSampler on a
FLUX.1-Fill-shaped model loaded by the stock UNETLoader -> ASUKA masked decode), batch 2,
128x128, 2 steps, random weights.

What reaches the FLUX transformer is recorded on every model call by a test probe
(``ASUKATest_RecordModelInputs``) and checked against a re-computation in this process:
the official blend ``empty + 0.5 (aligner - empty)`` written out by hand over the
aligners' raw outputs, with the MAE run here on the same pixels.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.host.comfy_client import box_mask, make_picture, read_records, unique
from tests.host.flux_support import flux_inpaint_graph, flux_models  # noqa: F401  (fixture)

pytestmark = pytest.mark.host

SIZE = 128
SEED = 515151
EMPTY_SEED = 7
TIMEOUT = 420


@pytest.fixture(scope="module")
def pictures():
    mask = box_mask(SIZE, (0.25, 0.3, 0.75, 0.7))
    return [make_picture(SIZE, seed=301), make_picture(SIZE, seed=302)], mask


@pytest.fixture(scope="module")
def flux_runs(host_server, flux_models, pictures):  # noqa: F811
    """Two runs of the same batch-2 graph and seed; the second has a new recording path (so
    the sampler runs again) and a new filename prefix."""
    c = host_server.client
    pics, mask = pictures
    names = [c.upload_image(pics[0], mask), c.upload_image(pics[1], mask)]
    runs = {"names": names}
    for tag in ("a", "a2"):
        record = os.path.join(host_server.record_dir, f"flux-{tag}-{unique()}.jsonl")
        g = flux_inpaint_graph(host=host_server, flux=flux_models, images=names, record_path=record, seed=SEED,
                               prefix=unique(f"flux-{tag}"), empty_seed=EMPTY_SEED)
        runs[tag] = c.run(g.prompt(), timeout=TIMEOUT)
        runs["graph"] = g
        runs[tag + "_records"] = read_records(record)
    return runs


def _ok(runs, tag):
    res = runs[tag]
    assert res.ok, f"run {tag}: {res.describe()}"
    return res


def test_flux_graph_runs_with_batch_2(flux_runs, comfy, pictures, host):
    res = _ok(flux_runs, "a")
    imgs = comfy.images(res, "save")
    assert len(imgs) == 2 and all(i.shape == (SIZE, SIZE, 3) for i in imgs)
    pics, mask = pictures
    for img, pic in zip(imgs, pics):
        # composite: unmasked pixels are the input's; something was decoded in the hole
        assert np.abs(img.astype(int) - pic.astype(int))[mask == 0].max() <= 1
        assert np.abs(img.astype(int) - pic.astype(int))[mask == 1].mean() > 1.0
    log = comfy.log_text()
    assert "unet missing" not in log and "Missing VAE keys" not in log, "a loader left weights uninitialised"


def test_model_receives_aligner_tokens_pooled_vector_and_guidance(flux_runs):
    _ok(flux_runs, "a")
    records = flux_runs["a_records"]
    # 2 euler steps at cfg 1.0: the negative is never evaluated -> one call per step, whole batch
    assert len(records) == 2, records
    for r in records:
        assert r["context"] == [2, 256, 4096], r["context"]      # 256 ASUKA tokens, no T5 text tokens
        assert r["y"] == [2, 768], r["y"]                        # the pooled vector
        assert r["guidance"] == [30.0, 30.0]
        assert r["c_concat"] == [2, 80, SIZE // 8, SIZE // 8]     # Fill: 16 image-latent + 64 mask channels
        assert r["input"] == [2, 16, SIZE // 8, SIZE // 8]
        assert r["cond_or_uncond"] == [0], "the uncond pass ran at cfg 1.0"
        assert r["finite"]


def test_recorded_conditioning_is_the_official_blend(flux_runs, host, flux_models, pictures):  # noqa: F811
    """Recompute here: MAE features of the same pixels, each aligner's raw output, then the
    blend by hand. The probe saw exactly that (float32 CPU on both sides)."""
    from asuka_core.aligner import load_aligner
    from asuka_core.mae import load_mae
    from tests.fixtures.flux_files import stand_in_empty

    _ok(flux_runs, "a")
    rec = flux_runs["a_records"][0]
    pics, mask = pictures
    image = torch.from_numpy(np.stack(pics)).float() / 255.0
    folder = host.models.folder
    with torch.no_grad():
        feats = load_mae(os.path.join(folder, host.models.mae)).encode(
            image, torch.from_numpy(mask)[None]).features
        clip_tokens = load_aligner(os.path.join(folder, host.models.flux_aligner), dtype=torch.float32)(feats)
        t5_tokens = load_aligner(os.path.join(folder, flux_models.t5_aligner), dtype=torch.float32)(feats)
    e_txt, e_vec = stand_in_empty(EMPTY_SEED)
    pooled = 0.5 * (clip_tokens.double().sum(dim=1) / 256) + 0.5 * e_vec.double()
    txt = 0.5 * t5_tokens.double() + 0.5 * e_txt.double()

    np.testing.assert_allclose(np.array(rec["y_values"]), pooled.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(rec["context_head"]), txt[:, :3, :6].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(rec["context_tail"]), txt[:, -1, -6:].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(rec["context_abs_sum"]), txt.abs().sum(dim=(1, 2)).numpy(), rtol=1e-4)
    # per image: the two pictures get different conditioning
    head, y = np.array(rec["context_head"]), np.array(rec["y_values"])
    assert np.abs(head[0] - head[1]).max() > 1e-3 and np.abs(y[0] - y[1]).max() > 1e-3


def test_blend_equals_core_conditioning_average(host, flux_models, flux_runs):  # noqa: F811
    """A second implementation of the blend, in the server: the node at weight 1 (pure prior)
    followed by ComfyUI's own ConditioningAverage(to = ASUKA, from = empty, 0.5) hands the
    model the same tokens, pooled vector and guidance as the node's weight 0.5 blend."""
    record = os.path.join(host.record_dir, f"flux-avg-{unique()}.jsonl")
    g = flux_inpaint_graph(host=host, flux=flux_models, images=flux_runs["names"], record_path=record,
                           seed=SEED, prefix=unique("flux-avg"), empty_seed=EMPTY_SEED, core_average=0.5, steps=1)
    res = host.client.run(g.prompt(), timeout=TIMEOUT)
    assert res.ok, res.describe()
    core, ours = read_records(record)[0], _ok(flux_runs, "a") and flux_runs["a_records"][0]
    assert core["context"] == ours["context"] == [2, 256, 4096] and core["guidance"] == ours["guidance"]
    for key in ("y_values", "context_head", "context_tail", "context_abs_sum"):
        np.testing.assert_allclose(np.array(core[key]), np.array(ours[key]), rtol=1e-5, atol=1e-6, err_msg=key)


def test_same_seed_gives_identical_pixels(flux_runs, comfy):
    a, a2 = _ok(flux_runs, "a"), _ok(flux_runs, "a2")
    assert "sampler" not in a2.cached_nodes, "the second run was served from the cache; it proves nothing"
    assert flux_runs["a2_records"], "the KSampler of the second run did not call the model"
    for x, y in zip(comfy.images(a, "save"), comfy.images(a2, "save")):
        np.testing.assert_array_equal(x, y)


def test_models_are_not_reloaded_between_prompts(flux_runs):
    """The second prompt reuses the loaded FLUX model and both aligners (ComfyUI's cache)."""
    a2 = _ok(flux_runs, "a2")
    g = flux_runs["graph"]
    loaders = g.find("UNETLoader") + g.find("ASUKA_AlignerLoader") + g.find("ASUKA_MAELoader")
    assert len(loaders) == 4 and set(loaders) <= a2.cached_nodes, (loaders, a2.cached_nodes)
    assert "cond" in a2.cached_nodes, "the FLUX conditioning was recomputed for unchanged inputs"


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("case, message", [
    ("swapped", "swapped"),
    ("clip_twice", "('t5_aligner') needs an aligner for FLUX.1 T5 token sequence"),
    ("sd15", "('clip_aligner') needs an aligner for FLUX.1 pooled CLIP vector"),
    ("no_empty", "no 'empty' conditioning is connected"),
])
def test_wrong_inputs_give_clear_errors(host, flux_models, flux_runs, case, message):  # noqa: F811
    """Wrong aligner in a slot, or the default 0.5 blend without an empty prompt: the node
    stops with the reason, the server keeps running (the next test checks it)."""
    c, m = host.client, host.models
    slots = {"swapped": (flux_models.t5_aligner, m.flux_aligner),
             "clip_twice": (m.flux_aligner, m.flux_aligner),
             "sd15": (m.sd15_aligner, flux_models.t5_aligner),
             "no_empty": (None, None)}[case]
    g = flux_inpaint_graph(host=host, flux=flux_models, images=flux_runs["names"][:1], record_path=None,
                           seed=SEED, prefix=unique("flux-err"), clip_aligner=slots[0], t5_aligner=slots[1],
                           empty_seed=None if case == "no_empty" else EMPTY_SEED)
    res = c.run(g.prompt(), timeout=TIMEOUT)
    assert res.status == "error", res.describe()
    assert res.error_node == ("cond", "ASUKA_FluxConditioning"), res.error_node
    assert message in res.message, res.message


def test_weight_one_without_empty_runs(host, flux_models, flux_runs):  # noqa: F811
    """The paper's setting (pure prior) needs no text encoder."""
    g = flux_inpaint_graph(host=host, flux=flux_models, images=flux_runs["names"][:1], record_path=None,
                           seed=SEED, prefix=unique("flux-w1"), weight=1.0, empty_seed=None, steps=1)
    res = host.client.run(g.prompt(), timeout=TIMEOUT)
    assert res.ok, res.describe()
    assert host.client.image(res, "save").shape == (SIZE, SIZE, 3)


# ------------------------------------------------------------------------------ example workflow


def test_flux_example_runs(host, flux_models, pictures):  # noqa: F811
    """example_workflows/asuka_flux_fill.json, converted as the frontend's Queue button does,
    has the official settings and runs with the test models after swapping in their file
    names, a 2-step schedule and the stand-in empty prompt for the text-encoder pair."""
    import json
    import sys

    from tests.host.comfy_client import REPO

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import workflows  # scripts/workflows.py

    c, m = host.client, host.models
    with open(workflows.path("asuka_flux_fill")) as f:
        prompt = workflows.to_api_prompt(json.load(f), c.object_info())
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append((node_id, node["inputs"]))
    one = {t: v[0][1] for t, v in by_type.items()}
    # the official settings, as committed
    assert one["KSampler"]["cfg"] == 1.0 and one["KSampler"]["steps"] == 50
    assert one["KSampler"]["sampler_name"] == "euler" and one["KSampler"]["scheduler"] == "simple"
    assert one["InpaintModelConditioning"]["noise_mask"] is False
    assert one["ASUKA_FluxConditioning"]["weight"] == 0.5 and one["ASUKA_FluxConditioning"]["guidance"] == 30.0
    size_id = by_type["GetImageSize"][0][0]
    assert one["ModelSamplingFlux"]["width"] == [size_id, 0] and one["ModelSamplingFlux"]["height"] == [size_id, 1]
    assert (one["ModelSamplingFlux"]["max_shift"], one["ModelSamplingFlux"]["base_shift"]) == (1.15, 0.5)
    assert one["CLIPTextEncode"]["text"] == ""
    assert sorted(i["aligner_name"] for _, i in by_type["ASUKA_AlignerLoader"]) == [
        "asuka_alignment_clip.pt", "asuka_alignment_t5.pt"]

    # the test models
    pics, mask = pictures
    one["LoadImage"]["image"] = c.upload_image(pics[0], mask)
    one["UNETLoader"]["unet_name"] = flux_models.unet
    one["VAELoader"]["vae_name"] = flux_models.vae
    one["ASUKA_MAELoader"]["mae_name"] = m.mae
    one["ASUKA_DecoderLoader"]["decoder_name"] = m.asuka_decoder
    for _, inputs in by_type["ASUKA_AlignerLoader"]:
        inputs["aligner_name"] = {"asuka_alignment_clip.pt": m.flux_aligner,
                                  "asuka_alignment_t5.pt": flux_models.t5_aligner}[inputs["aligner_name"]]
    one["KSampler"]["steps"] = 2
    one["SaveImage"]["filename_prefix"] = unique("flux-example")
    for kind in ("DualCLIPLoader", "CLIPTextEncode"):
        del prompt[by_type[kind][0][0]]
    prompt["empty_standin"] = {"class_type": "ASUKATest_FluxEmpty", "inputs": {"seed": EMPTY_SEED}}
    one["ASUKA_FluxConditioning"]["empty"] = ["empty_standin", 0]

    res = c.run(prompt, timeout=TIMEOUT)
    assert res.ok, res.describe()
    out = c.image(res, by_type["SaveImage"][0][0])
    assert out.shape == (SIZE, SIZE, 3)
    assert np.abs(out.astype(int) - pics[0].astype(int))[mask == 0].max() <= 1
