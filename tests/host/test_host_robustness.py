"""Robustness, through a real ComfyUI server: every bad input ends as an execution error (or
a 400 validation error, where ComfyUI validates first) with a message that tells the user
what to do, and the next good prompt still succeeds; odd but valid inputs work; memory
stays flat over many prompts; a long decode can be interrupted; results are deterministic."""

from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest

from tests.host.comfy_client import Graph, box_mask, make_picture, read_records, sd15_inpaint_graph, unique

pytestmark = pytest.mark.host

SIZE = 256
RSS_GROWTH_LIMIT = 300 * 1024 * 1024
N_SMALL_PROMPTS = 50


# ---------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def pictures(host_server):
    """Uploaded inputs shared by this module: name -> LoadImage file name."""
    c = host_server.client
    pic_a, pic_b = make_picture(SIZE, seed=301), make_picture(SIZE, seed=302)
    mask = box_mask(SIZE)
    return {
        "a": c.upload_image(pic_a, mask, name="robust-a.png"),
        "b": c.upload_image(pic_b, mask, name="robust-b.png"),
        "empty": c.upload_image(pic_a, np.zeros((SIZE, SIZE), np.float32), name="robust-empty.png"),
        "full": c.upload_image(pic_a, np.ones((SIZE, SIZE), np.float32), name="robust-full.png"),
        "small_mask": c.upload_image(make_picture(128, seed=303), box_mask(128, (0.1, 0.2, 0.5, 0.9)),
                                     name="robust-mask128.png"),
        "odd": c.upload_image(make_picture((250, 250), seed=304), box_mask((250, 250)), name="robust-250.png"),
        "wide": c.upload_image(make_picture((SIZE, 320), seed=305), box_mask((SIZE, 320)),
                               name="robust-320.png"),
        "grey": c.upload_image(make_picture(SIZE, seed=306)[..., 0], mask, name="robust-grey.png", mode="LA"),
        "a128": c.upload_image(make_picture(128, seed=307), box_mask(128), name="robust-a128.png"),
        "b128": c.upload_image(make_picture(128, seed=308), box_mask(128), name="robust-b128.png"),
        "pic_a": pic_a,
        "mask": mask,
    }


def mae_graph(host, image: str, *, mae: str | None = None, mask_image: str | None = None,
              prefix: str | None = None) -> Graph:
    g = Graph()
    load = g.add("LoadImage", _id="image", image=image)
    mask_src = g.add("LoadImage", _id="mask_image", image=mask_image) if mask_image else load
    m = g.add("ASUKA_MAELoader", _id="mae", mae_name=mae or host.models.mae)
    prior = g.add("ASUKA_MAEPrior", _id="prior", mae=m[0], image=load[0], mask=mask_src[1])
    g.add("SaveImage", _id="save", images=prior[1], filename_prefix=prefix or unique("mae"))
    return g


def decode_graph(host, image: str, *, decoder: str | None = None, latent: str = "EmptyLatentImage",
                 latent_size: tuple[int, int] = (SIZE, SIZE), mask_image: str | None = None,
                 tile_size: int = 0, tile_overlap: int = 32, composite: bool = True,
                 multiplier: float | None = None) -> Graph:
    g = Graph()
    load = g.add("LoadImage", _id="image", image=image)
    mask_src = g.add("LoadImage", _id="mask_image", image=mask_image) if mask_image else load
    lat = g.add(latent, _id="latent", width=latent_size[0], height=latent_size[1], batch_size=1)
    if multiplier is not None:
        lat = g.add("LatentMultiply", _id="multiply", samples=lat[0], multiplier=multiplier)
    d = g.add("ASUKA_DecoderLoader", _id="decoder", decoder_name=decoder or host.models.avq_decoder)
    out = g.add("ASUKA_MaskedDecode", _id="decode", decoder=d[0], samples=lat[0], image=load[0],
                mask=mask_src[1], composite=composite, tile_size=tile_size, tile_overlap=tile_overlap)
    g.add("SaveImage", _id="save", images=out[0], filename_prefix=unique("decode"))
    return g


def assert_refused(res, *patterns: str, node_type: str | None = None):
    """An execution error (or a 400 validation error) whose message matches every pattern."""
    assert res.status in ("error", "invalid"), f"expected an error, got {res.describe()}"
    assert not res.interrupted, res.describe()
    msg = res.message
    for p in patterns:
        assert re.search(p, msg, re.I | re.S), f"message does not match {p!r}:\n{msg}"
    assert "Traceback" not in msg and len(msg) >= 40, f"not a helpful message:\n{msg}"
    if node_type and res.status == "error":
        assert res.error_node[1] == node_type, res.describe()


def assert_recovers(comfy, host, pictures):
    """A good prompt right after a failure succeeds."""
    res = comfy.run(mae_graph(host, pictures["a"]).prompt(), timeout=300)
    assert res.ok, f"the server did not recover: {res.describe()}"


# ---------------------------------------------------------------------------- SD1.5 graphs
# First in the module: the SD1.5 checkpoint is then usually still cached from
# test_host_pipeline (an optimisation only).

def test_full_mask_gives_a_finite_prior(comfy, host, pictures):
    """Every patch masked: the MAE has nothing to look at; the official code then uses a zero
    feature. The MAE must succeed and the prior must flow through the aligner into the UNet
    as finite tokens."""
    record = os.path.join(host.record_dir, f"full-mask-{unique()}.jsonl")
    g = sd15_inpaint_graph(checkpoint=host.checkpoint, mae=host.models.mae, aligner=host.models.sd15_aligner,
                           image=pictures["full"], record_path=record, seed=5, prefix=unique("full-mask"))
    res = comfy.run(g.prompt(), timeout=420)
    assert res.ok, res.describe()
    records = read_records(record)
    assert records and all(r["finite"] for r in records), "non-finite conditioning reached the UNet"
    assert comfy.image(res, "save_vae").shape == (SIZE, SIZE, 3)


def test_sd15_graph_with_flux_aligner_is_refused(comfy, host, pictures):
    record = os.path.join(host.record_dir, f"flux-{unique()}.jsonl")
    g = sd15_inpaint_graph(checkpoint=host.checkpoint, mae=host.models.mae, aligner=host.models.flux_aligner,
                           image=pictures["a"], record_path=record, seed=6, prefix=unique("flux-aligner"))
    res = comfy.run(g.prompt(), timeout=420)
    assert_refused(res, r"FLUX", r"SD ?1\.5", r"sd15|SD1\.5 aligner", node_type="ASUKA_AlignerConditioning")
    assert not read_records(record), "the sampler ran although the conditioning was refused"
    assert_recovers(comfy, host, pictures)


# ---------------------------------------------------------------------------- wrong / broken files

WRONG_FILES = {
    # case: (graph, file attribute, node raising, patterns the message must match)
    "checkpoint_as_mae": ("mae", "checkpoint_as_mae", "ASUKA_MAELoader", (r"stable diffusion", r"MAE")),
    "aligner_as_mae": ("mae", "sd15_aligner", "ASUKA_MAELoader", (r"aligner", r"MAE")),
    "mae_as_decoder": ("decoder", "mae", "ASUKA_DecoderLoader", (r"MAE", r"decoder")),
    "truncated_mae": ("mae", "truncated_mae", "ASUKA_MAELoader", (r"damaged|truncated|corrupt", r"download|again")),
    "truncated_decoder": ("decoder", "truncated_decoder", "ASUKA_DecoderLoader",
                          (r"damaged|truncated|corrupt", r"download|again")),
}


@pytest.mark.parametrize("case", list(WRONG_FILES))
def test_wrong_or_broken_model_file(comfy, host, pictures, case):
    kind, attr, node_type, patterns = WRONG_FILES[case]
    name = getattr(host.models, attr)
    g = (mae_graph(host, pictures["a"], mae=name) if kind == "mae"
         else decode_graph(host, pictures["a"], decoder=name))
    res = comfy.run(g.prompt(), timeout=300)
    assert_refused(res, *patterns, node_type=node_type)
    assert re.search(re.escape(os.path.splitext(name)[0]), res.message), f"the message does not name the file:\n{res.message}"
    assert_recovers(comfy, host, pictures)


# ---------------------------------------------------------------------------- masks and images

def test_empty_mask_is_refused(comfy, host, pictures):
    res = comfy.run(mae_graph(host, pictures["empty"]).prompt(), timeout=300)
    assert_refused(res, r"empty|nothing to inpaint", r"mask", node_type="ASUKA_MAEPrior")
    assert_recovers(comfy, host, pictures)


def _batch_graph(host, image: str, n_images: int, n_masks: int) -> Graph:
    g = Graph()
    load = g.add("LoadImage", _id="image", image=image)
    images = g.add("RepeatImageBatch", image=load[0], amount=n_images) if n_images > 1 else load
    mask = load[1]
    if n_masks > 1:
        as_image = g.add("MaskToImage", mask=load[1])
        rep = g.add("RepeatImageBatch", image=as_image[0], amount=n_masks)
        mask = g.add("ImageToMask", image=rep[0], channel="red")[0]
    m = g.add("ASUKA_MAELoader", mae_name=host.models.mae)
    prior = g.add("ASUKA_MAEPrior", mae=m[0], image=images[0], mask=mask)
    g.add("SaveImage", _id="save", images=prior[1], filename_prefix=unique("batch"))
    return g


def test_mask_batch_mismatch_is_refused(comfy, host, pictures):
    res = comfy.run(_batch_graph(host, pictures["a"], 2, 3).prompt(), timeout=300)
    assert_refused(res, r"\b2\b", r"\b3\b", r"one mask per image|single mask", node_type="ASUKA_MAEPrior")
    assert_recovers(comfy, host, pictures)


def test_one_mask_for_a_batch_of_images_works(comfy, host, pictures):
    res = comfy.run(_batch_graph(host, pictures["a"], 2, 1).prompt(), timeout=300)
    assert res.ok, res.describe()
    imgs = comfy.images(res, "save")
    assert len(imgs) == 2 and all(i.shape == (SIZE, SIZE, 3) for i in imgs)


def test_mask_of_another_size_is_resized(comfy, host, pictures):
    res = comfy.run(mae_graph(host, pictures["a"], mask_image=pictures["small_mask"]).prompt(), timeout=300)
    assert res.ok, res.describe()
    assert comfy.image(res, "save").shape == (SIZE, SIZE, 3)
    res = comfy.run(decode_graph(host, pictures["a"], mask_image=pictures["small_mask"]).prompt(), timeout=300)
    assert res.ok, res.describe()
    assert comfy.image(res, "save").shape == (SIZE, SIZE, 3)


def test_grey_and_rgba_images_work(comfy, host, pictures):
    # A grey+alpha PNG through LoadImage, then a 4-channel IMAGE tensor from core JoinImageWithAlpha.
    res = comfy.run(mae_graph(host, pictures["grey"]).prompt(), timeout=300)
    assert res.ok, res.describe()
    res = comfy.run(decode_graph(host, pictures["grey"]).prompt(), timeout=300)
    assert res.ok, res.describe()
    g = Graph()
    load = g.add("LoadImage", image=pictures["a"])
    rgba = g.add("JoinImageWithAlpha", image=load[0], alpha=load[1])
    m = g.add("ASUKA_MAELoader", mae_name=host.models.mae)
    prior = g.add("ASUKA_MAEPrior", mae=m[0], image=rgba[0], mask=load[1])
    g.add("SaveImage", _id="save_prior", images=prior[1], filename_prefix=unique("rgba-prior"))
    lat = g.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    d = g.add("ASUKA_DecoderLoader", decoder_name=host.models.avq_decoder)
    out = g.add("ASUKA_MaskedDecode", decoder=d[0], samples=lat[0], image=rgba[0], mask=load[1],
                composite=True, tile_size=0, tile_overlap=32)
    g.add("SaveImage", _id="save_decode", images=out[0], filename_prefix=unique("rgba-decode"))
    res = comfy.run(g.prompt(), timeout=300)
    assert res.ok, res.describe()
    out = comfy.image(res, "save_decode").astype(int)
    keep = pictures["mask"] == 0
    assert np.abs(out - pictures["pic_a"].astype(int))[keep].max() <= 1, "alpha leaked into the composite"


# ---------------------------------------------------------------------------- decoder inputs

def test_image_not_multiple_of_8_is_cropped_as_vae_encode_does(comfy, host, pictures):
    """A 250 px picture gives a 248 px latent (VAEEncode crops 1 px on each side): the
    decoder crops the picture the same way instead of refusing it."""
    res = comfy.run(decode_graph(host, pictures["odd"], latent_size=(248, 248)).prompt(), timeout=300)
    assert res.ok, res.describe()
    assert comfy.image(res, "save").shape[:2] == (248, 248)


def test_latent_and_image_size_mismatch_is_refused(comfy, host, pictures):
    res = comfy.run(decode_graph(host, pictures["wide"]).prompt(), timeout=300)
    assert_refused(res, r"320", r"latent", r"same (image|size)", node_type="ASUKA_MaskedDecode")
    assert_recovers(comfy, host, pictures)


def test_latent_channel_mismatch_is_refused(comfy, host, pictures):
    res = comfy.run(decode_graph(host, pictures["a"], latent="EmptySD3LatentImage").prompt(), timeout=300)
    assert_refused(res, r"\b16\b", r"\b4\b", r"decoder", node_type="ASUKA_MaskedDecode")
    assert_recovers(comfy, host, pictures)


def test_too_small_tile_is_refused(comfy, host, pictures):
    res = comfy.run(decode_graph(host, pictures["a"], tile_size=32).prompt(), timeout=300)
    assert_refused(res, r"32 px", r"at least 64", node_type="ASUKA_MaskedDecode")
    assert_recovers(comfy, host, pictures)


def test_nan_latent_is_refused(comfy, host, pictures):
    """ComfyUI's validation lets a NaN float widget through (every comparison with NaN is
    false), so core LatentMultiply(multiplier=NaN) makes an all-NaN latent."""
    res = comfy.run(decode_graph(host, pictures["a"], multiplier=float("nan")).prompt(), timeout=300)
    if res.status == "invalid":
        pytest.skip(f"this ComfyUI refuses a NaN multiplier, so no core node can make a NaN latent: {res.message}")
    assert_refused(res, r"NaN", r"sampler|diverged", node_type="ASUKA_MaskedDecode")
    assert_recovers(comfy, host, pictures)


# ---------------------------------------------------------------------------- server behaviour

def _pack_loads(log: str) -> list[str]:
    return re.findall(r"^.*\bloaded \S+\.(?:pth|pt|ckpt|safetensors) \(.*$", log, re.M)


def _small_graph(host, image: str) -> Graph:
    g = Graph()
    load = g.add("LoadImage", image=image)
    m = g.add("ASUKA_MAELoader", _id="mae", mae_name=host.models.mae)
    prior = g.add("ASUKA_MAEPrior", _id="prior", mae=m[0], image=load[0], mask=load[1])
    g.add("SaveImage", _id="save_prior", images=prior[1], filename_prefix=unique("many-prior"))
    lat = g.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    d = g.add("ASUKA_DecoderLoader", _id="decoder", decoder_name=host.models.avq_decoder)
    out = g.add("ASUKA_MaskedDecode", _id="decode", decoder=d[0], samples=lat[0], image=load[0], mask=load[1],
                composite=False, tile_size=0, tile_overlap=32)
    g.add("SaveImage", _id="save_decode", images=out[0], filename_prefix=unique("many-decode"))
    return g


def test_many_prompts_keep_memory_flat_and_models_loaded_once(comfy, host, pictures):
    names = [pictures["a128"], pictures["b128"]]  # alternate, so the pack nodes really run every time
    for i in range(6):  # warm-up
        res = comfy.run(_small_graph(host, names[i % 2]).prompt(), timeout=300)
        assert res.ok, res.describe()
    rss0 = comfy.rss_bytes()
    loads0 = len(_pack_loads(comfy.log_text()))
    t0 = time.time()
    ids = []
    for i in range(N_SMALL_PROMPTS):
        pid, body = comfy.queue(_small_graph(host, names[i % 2]).prompt())
        assert pid, body
        ids.append(pid)
    results = [comfy.wait(pid, timeout=600) for pid in ids]
    elapsed = time.time() - t0
    rss1 = comfy.rss_bytes()
    failed = [r.describe() for r in results if not r.ok]
    assert not failed, failed[:3]
    reran = [r for r in results if not {"prior", "decode"} & r.cached_nodes]
    assert len(reran) == len(results), "some prompts were served from the cache"
    assert all({"mae", "decoder"} <= r.cached_nodes for r in results), "the loaders ran again"
    new_loads = _pack_loads(comfy.log_text())[loads0:]
    print(f"\n[host] {N_SMALL_PROMPTS} prompts in {elapsed:.1f}s; RSS {rss0 / 2**20:.0f} -> "
          f"{rss1 / 2**20:.0f} MiB; model loads during the run: {len(new_loads)}")
    assert not new_loads, f"models were loaded again: {new_loads}"
    assert rss1 - rss0 < RSS_GROWTH_LIMIT, (
        f"server RSS grew by {(rss1 - rss0) / 2**20:.0f} MiB over {N_SMALL_PROMPTS} prompts "
        f"(limit {RSS_GROWTH_LIMIT / 2**20:.0f} MiB)")
    # Same input, same output: prompts 0 and 2 saw picture a, with picture b in between.
    for node in ("save_prior", "save_decode"):
        np.testing.assert_array_equal(comfy.image(results[0], node), comfy.image(results[2], node))


def test_interrupt_stops_a_long_decode(comfy, host, pictures):
    size = 2048
    g = Graph()
    img = g.add("EmptyImage", width=size, height=size, batch_size=1, color=0x4080C0)
    mask = g.add("SolidMask", value=1.0, width=size, height=size)
    lat = g.add("EmptySD3LatentImage", width=size, height=size, batch_size=1)
    d = g.add("ASUKA_DecoderLoader", decoder_name=host.models.asuka_decoder)
    out = g.add("ASUKA_MaskedDecode", _id="decode", decoder=d[0], samples=lat[0], image=img[0], mask=mask[0],
                composite=True, tile_size=256, tile_overlap=32)
    g.add("SaveImage", images=out[0], filename_prefix=unique("interrupt"))
    pid, body = comfy.queue(g.prompt())
    assert pid, body
    t_queue = time.time()
    # Wait until the decode node itself is running (its progress reaches the log/queue), then cancel.
    while True:
        q = comfy.queue_size()
        if any(item[1] == pid for item in q.get("queue_running", [])):
            break
        assert time.time() - t_queue < 120, "the prompt never started"
        time.sleep(0.1)
    time.sleep(4.0)
    assert pid not in comfy.get_json(f"/history/{pid}"), (
        "the 2048x2048 tiled decode finished in under 4 s; make it bigger so the interrupt test means something")
    t_int = time.time()
    comfy.interrupt()
    res = comfy.wait(pid, timeout=120)
    stopped_after = time.time() - t_int
    print(f"\n[host] interrupt: ran {t_int - t_queue:.1f}s, stopped {stopped_after:.1f}s after /interrupt")
    assert res.status == "error" and res.interrupted, res.describe()
    assert stopped_after < 10, f"took {stopped_after:.1f}s to stop after /interrupt"
    assert_recovers(comfy, host, pictures)


def test_same_graph_and_inputs_give_identical_pixels(comfy, host, pictures):
    def graph(name):
        return decode_graph(host, pictures[name], composite=False, tile_size=64, tile_overlap=16,
                            latent_size=(128, 128)).prompt()

    first = comfy.run(graph("a128"), timeout=300)
    assert first.ok, first.describe()
    other = comfy.run(graph("b128"), timeout=300)
    assert other.ok, other.describe()
    again = comfy.run(graph("a128"), timeout=300)
    assert again.ok, again.describe()
    assert "decode" not in again.cached_nodes, "the decode was served from the cache"
    np.testing.assert_array_equal(comfy.image(first, "save"), comfy.image(again, "save"))
    assert np.abs(comfy.image(first, "save").astype(int) - comfy.image(other, "save").astype(int)).mean() > 0.5
