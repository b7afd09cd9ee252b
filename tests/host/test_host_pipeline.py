"""The MAE, aligner and decoder issues end to end, through a real ComfyUI server: the full
SD1.5 inpainting graph with ASUKA conditioning (random-weight SD1.5 inpainting checkpoint,
256x256, 2 steps, cfg 1.0), decoded by core VAEDecode and by ASUKA_MaskedDecode, and the
16-channel ASUKA decoder on FLUX-shaped latents."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.host.comfy_client import (Graph, box_mask, make_picture, read_records, sd15_inpaint_graph,
                                     unique)

pytestmark = pytest.mark.host

SIZE = 256
SEED = 424242
SD_TIMEOUT = 420


# The graphs without the SD1.5 checkpoint run first and the SD1.5 runs last, so the
# checkpoint is still in ComfyUI's cache when test_host_robustness starts with its SD1.5
# graphs (only an optimisation: every test stands alone).


def test_official_vit_b_mae_file_runs(comfy, host):
    """A file shaped exactly like the released mae_300.pth (ViT-B, Finetune keys, {'model': sd})."""
    h, w = 240, 320
    name = comfy.upload_image(make_picture((h, w), seed=5), box_mask((h, w)))
    g = Graph()
    load = g.add("LoadImage", image=name)
    mae = g.add("ASUKA_MAELoader", mae_name=host.models.mae_vitb)
    prior = g.add("ASUKA_MAEPrior", mae=mae[0], image=load[0], mask=load[1])
    g.add("SaveImage", _id="save", images=prior[1], filename_prefix=unique("vitb"))
    res = comfy.run(g.prompt(), timeout=300)
    assert res.ok, res.describe()
    assert comfy.image(res, "save").shape == (h, w, 3)


def test_asuka_decoder_decodes_16_channel_latents(comfy, host):
    """The ASUKA (FLUX) decoder on a 16-channel latent from core EmptySD3LatentImage, whole and
    tiled, with and without compositing."""
    size = 256
    picture = make_picture(size, seed=7)
    mask = box_mask(size, (0.2, 0.2, 0.6, 0.8))
    name = comfy.upload_image(picture, mask)
    g = Graph()
    load = g.add("LoadImage", image=name)
    latent = g.add("EmptySD3LatentImage", width=size, height=size, batch_size=1)
    dec = g.add("ASUKA_DecoderLoader", decoder_name=host.models.asuka_decoder)
    variants = {"whole_comp": (True, 0, 64), "whole_raw": (False, 0, 64),
                "tiled_comp": (True, 128, 32), "tiled_raw": (False, 128, 32)}
    for key, (comp, tile, overlap) in variants.items():
        out = g.add("ASUKA_MaskedDecode", decoder=dec[0], samples=latent[0], image=load[0], mask=load[1],
                    composite=comp, tile_size=tile, tile_overlap=overlap)
        g.add("SaveImage", _id=key, images=out[0], filename_prefix=unique(key))
    res = comfy.run(g.prompt(), timeout=600)
    assert res.ok, res.describe()
    keep = mask == 0
    imgs = {k: comfy.image(res, k).astype(int) for k in variants}
    for key, img in imgs.items():
        assert img.shape == (size, size, 3), (key, img.shape)
    for key in ("whole_comp", "tiled_comp"):
        d = np.abs(imgs[key] - picture.astype(int))[keep]
        assert d.max() <= 1, f"{key}: unmasked pixels changed by up to {d.max()}"
    for key in ("whole_raw", "tiled_raw"):
        assert np.abs(imgs[key] - picture.astype(int))[keep].mean() > 1.0, f"{key} looks composited"
    # Composite = raw inside the hole (the mask is hard 0/1 here).
    hole = mask == 1
    for raw, comp in (("whole_raw", "whole_comp"), ("tiled_raw", "tiled_comp")):
        assert np.abs(imgs[raw] - imgs[comp])[hole].max() <= 1, (raw, comp)


def test_official_size_asuka_decoder_file_runs(comfy, host):
    """asuka_decoder.ckpt with the released layout and size (Lightning wrapper, 16-channel
    latents, width 128, unused training keys), decoded at a small size to stay fast."""
    size = 64
    picture = make_picture(size, seed=8)
    mask = box_mask(size)
    name = comfy.upload_image(picture, mask)
    g = Graph()
    load = g.add("LoadImage", image=name)
    latent = g.add("EmptySD3LatentImage", width=size, height=size, batch_size=1)
    dec = g.add("ASUKA_DecoderLoader", decoder_name=host.models.asuka_decoder_full)
    out = g.add("ASUKA_MaskedDecode", decoder=dec[0], samples=latent[0], image=load[0], mask=load[1],
                composite=True, tile_size=0, tile_overlap=64)
    g.add("SaveImage", _id="save", images=out[0], filename_prefix=unique("asuka-full"))
    res = comfy.run(g.prompt(), timeout=300)
    assert res.ok, res.describe()
    img = comfy.image(res, "save").astype(int)
    assert img.shape == (size, size, 3)
    assert np.abs(img - picture.astype(int))[mask == 0].max() <= 1


@pytest.fixture(scope="module")
def sd_runs(host_server):
    """SD1.5 runs shared by the tests below. Each run is two prompts: the graph with
    VAEDecode, then the same graph with ASUKA_MaskedDecode (AVQ, composite) instead, whose
    sampler part is identical and so comes from ComfyUI's cache (a decoder bug cannot hide
    what the sampler did).

    a:  picture 1 + box mask, seed SEED
    b:  as a, but the MAE sees picture 2 (same mask): only the prior differs
    a2: as a, with a new recording path and filename prefix, so the KSampler runs again
    """
    c, m = host_server.client, host_server.models
    mask = box_mask(SIZE, (0.25, 0.3, 0.7, 0.75))
    pic1, pic2 = make_picture(SIZE, seed=101), make_picture(SIZE, seed=202)
    img1 = c.upload_image(pic1, mask)
    img2 = c.upload_image(pic2, mask)
    runs = {"mask": mask, "picture": pic1}

    def run(tag, prior_image=None):
        record = os.path.join(host_server.record_dir, f"{tag}-{unique()}.jsonl")
        for suffix, vae, masked in (("", True, None), ("_masked", False, m.avq_decoder)):
            g = sd15_inpaint_graph(checkpoint=host_server.checkpoint, mae=m.mae, aligner=m.sd15_aligner,
                                   image=img1, prior_image=prior_image, record_path=record, seed=SEED,
                                   prefix=unique(tag), vae_decode=vae, masked_decoder=masked)
            runs[tag + suffix] = c.run(g.prompt(), timeout=SD_TIMEOUT)
        runs[tag + "_records"] = read_records(record)

    run("a")
    run("b", prior_image=img2)
    run("a2")
    return runs


def _ok(runs, tag):
    res = runs[tag]
    assert res.ok, f"run {tag}: {res.describe()}"
    return res


def test_sd15_graph_runs_with_vae_decode(sd_runs, comfy):
    res = _ok(sd_runs, "a")
    assert comfy.image(res, "save_vae").shape == (SIZE, SIZE, 3)


def test_sd15_graph_runs_with_masked_decode(sd_runs, comfy):
    res = _ok(sd_runs, "a_masked")
    assert "sampler" in res.cached_nodes, "expected the sampler result of run a to be reused"
    assert comfy.image(res, "save_masked").shape == (SIZE, SIZE, 3)


def test_unet_cross_attention_sees_aligner_tokens_not_clip(sd_runs):
    _ok(sd_runs, "a")
    records = sd_runs["a_records"]
    # SD1.5 has 16 cross-attention blocks; 2 euler steps at cfg 1.0 (no uncond pass) -> 32 calls.
    assert len(records) >= 32 and len(records) % 16 == 0, len(records)
    shapes = {tuple(r["context"]) for r in records}
    assert shapes == {(1, 256, 768)}, shapes
    assert not any(r["context"][1] == 77 for r in records), "CLIP's 77 tokens reached the UNet"
    assert all(r["finite"] for r in records), "non-finite aligner tokens reached the UNet"


def test_prior_alone_changes_the_result(sd_runs, comfy):
    hole = sd_runs["mask"] > 0.5
    for a, b, node in (("a", "b", "save_vae"), ("a_masked", "b_masked", "save_masked")):
        pa = comfy.image(_ok(sd_runs, a), node).astype(int)
        pb = comfy.image(_ok(sd_runs, b), node).astype(int)
        diff = np.abs(pa - pb)[hole].mean()
        assert diff > 0.5, f"{node}: a different MAE prior did not change the inpainted pixels (mean diff {diff})"


def test_same_seed_gives_identical_pixels(sd_runs, comfy):
    a2 = _ok(sd_runs, "a2")
    assert "sampler" not in a2.cached_nodes, "the second run was served from the cache; it proves nothing"
    assert sd_runs["a2_records"], "the KSampler of the second run did not call the UNet"
    for a, b, node in (("a", "a2", "save_vae"), ("a_masked", "a2_masked", "save_masked")):
        np.testing.assert_array_equal(comfy.image(_ok(sd_runs, a), node), comfy.image(_ok(sd_runs, b), node),
                                      err_msg=node)


def test_masked_decode_composite_keeps_unmasked_pixels(sd_runs, comfy):
    res = _ok(sd_runs, "a_masked")
    out = comfy.image(res, "save_masked").astype(int)
    keep = sd_runs["mask"] == 0
    diff = np.abs(out - sd_runs["picture"].astype(int))
    assert diff[keep].max() <= 1, f"unmasked pixels changed by up to {diff[keep].max()}"
    # and it did decode something inside the hole (not the input pasted everywhere)
    assert diff[~keep].mean() > 1.0
