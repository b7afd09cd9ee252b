"""HD-Painter's inpainting-specialised x4 SR inside the real ComfyUI server, over HTTP, with a
small random-weight x4 upscaler checkpoint that ComfyUI's own CheckpointLoaderSimple detects
as SD_X4Upscaler (tests/fixtures/x4_upscaler_checkpoint.py).

Random weights: the pictures mean nothing; the tests check the wiring and the invariants
(known latent kept outside the mask, original pixels kept outside the blend region, sizes,
clear errors), not image quality.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.host.comfy_client import Graph, box_mask, make_picture, unique

pytestmark = pytest.mark.host

HR = 256          # output side; the inpainted picture is HR / 4
MASK_BOX = (0.55, 0.55, 0.85, 0.85)   # bottom-right: the top-left stays known
SMALL_BOX = (0.7, 0.7, 0.9, 0.9)


def _latent(comfy, result, node_id):
    files = result.outputs.get(node_id, {}).get("latents", [])
    assert len(files) == 1, result.outputs
    f = files[0]
    return load_file(os.path.join(comfy.output_dir, f.get("subfolder", ""), f["filename"]))["latent_tensor"]


def sr_graph(*, x4: str, hr_image: str, lr_image: str, tile_size: int = 0, steps: int = 2,
             model_from: tuple | None = None, vae_from: tuple | None = None, hr_scale: int | None = None,
             prefix: str = "sr", blend: bool = True, region: str | None = None) -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", _id="x4", ckpt_name=x4)
    pos = g.add("CLIPTextEncode", _id="pos", clip=ckpt[1], text="a boat, high resolution professional photo")
    neg = g.add("CLIPTextEncode", _id="neg", clip=ckpt[1], text="")
    hr = g.add("LoadImage", _id="hr", image=hr_image)
    lr = g.add("LoadImage", _id="lr", image=lr_image)
    hr_pixels = hr[0]
    if hr_scale:
        hr_pixels = g.add("ImageScale", _id="hr_scaled", image=hr[0], upscale_method="bilinear",
                          width=hr_scale, height=hr_scale, crop="disabled")[0]
    up = g.add("SD_4XUpscale_Conditioning", _id="up", images=lr[0], positive=pos[0], negative=neg[0],
               scale_ratio=4.0, noise_augmentation=0.057)
    sampler = g.add("HDPainter_SRSampler", _id="sampler", vae=list(vae_from or ckpt[2]), image=hr_pixels,
                    mask=hr[1], mask_grow=19, mask_blur=19, tile_size=tile_size, tile_overlap=32,
                    **({"region": region} if region else {}))
    model = list(model_from or ckpt[0])
    sigmas = g.add("BasicScheduler", _id="sigmas", model=model, scheduler="simple", steps=steps, denoise=1.0)
    sc = g.add("SamplerCustom", _id="sample", model=model, add_noise=True, noise_seed=7, cfg=7.5,
               positive=up[0], negative=up[1], sampler=sampler[0], sigmas=sigmas[0], latent_image=up[2])
    g.add("SaveLatent", _id="save_latent", samples=sc[0], filename_prefix=unique(prefix))
    if tile_size:
        known = g.add("VAEEncodeTiled", _id="known", pixels=hr_pixels, vae=ckpt[2], tile_size=512,
                      overlap=64, temporal_size=64, temporal_overlap=8)
    else:
        known = g.add("VAEEncode", _id="known", pixels=hr_pixels, vae=ckpt[2])
    g.add("SaveLatent", _id="save_known", samples=known[0], filename_prefix=unique(prefix + "-known"))
    if not blend:
        return g
    dec = g.add("VAEDecode", _id="decode", samples=sc[0], vae=ckpt[2])
    blend = g.add("ASUKA_PoissonBlend", _id="blend", original=hr_pixels, generated=dec[0], mask=hr[1],
                  padding=32, mask_grow=48)
    g.add("SaveImage", _id="save", images=blend[0], filename_prefix=unique(prefix + "-blend"))
    return g


@pytest.fixture(scope="module")
def uploads(host_server):
    comfy = host_server.client
    original = make_picture(HR, seed=21)
    return {
        "original": original,
        "hr": comfy.upload_image(original, box_mask(HR, MASK_BOX)),
        "hr_small": comfy.upload_image(make_picture(HR // 2, seed=24), box_mask(HR // 2, SMALL_BOX)),
        "lr_small": comfy.upload_image(make_picture(HR // 8, seed=25)),
        "lr": comfy.upload_image(make_picture(HR // 4, seed=22)),
        "lr_wrong": comfy.upload_image(make_picture(HR // 4 - 4, seed=23)),
    }


def far_from_mask(size: int, box, grow: int, extra: int = 0) -> np.ndarray:
    """True where a pixel is outside the mask's bounding box grown by ``grow`` px (+ ``extra``)."""
    m = np.ones((size, size), bool)
    t, l, b, r = (int(v * size) for v in box)
    g = grow + extra
    m[max(0, t - g):b + g, max(0, l - g):r + g] = False
    return m


def keep_cells(latent: int, box) -> np.ndarray:
    """Latent cells where the blend mask is exactly 0: farther than the 19-px growth (5 cells)
    plus the 19-tap blur's reach (9 cells), +1 for the bicubic resize, from the mask box."""
    return far_from_mask(latent, box, 19 // 4 + 1, extra=9 + 1)


def run_and_compare_known(comfy, g, latent: int, box):
    """Run an sr_graph; the sampled latent equals the separately encoded original wherever
    the blend mask is 0."""
    result = comfy.run(g.prompt(), timeout=600)
    assert result.ok, result.describe()
    sampled, known = _latent(comfy, result, "save_latent"), _latent(comfy, result, "save_known")
    assert sampled.shape == known.shape == (1, 4, latent, latent)
    keep = keep_cells(latent, box)
    assert keep.sum() > 200
    assert np.allclose(sampled[0][:, keep].numpy(), known[0][:, keep].numpy(), atol=1e-4)
    return result, sampled, known


def assert_original_outside_blend(out: np.ndarray, original: np.ndarray) -> None:
    """Poisson blend leaves the original untouched outside the grown mask's box (48-px square
    growth: +24 px on each side, +1 for OpenCV's fixed ring); inside, it changed the picture."""
    assert out.shape == (HR, HR, 3)
    far = far_from_mask(HR, MASK_BOX, 24 + 1)
    assert np.abs(out[far].astype(int) - original[far].astype(int)).max() <= 1
    assert np.abs(out[~far].astype(int) - original[~far].astype(int)).mean() > 1


def test_sr_keeps_the_known_latent_and_the_original(comfy, x4_upscaler_checkpoint, uploads):
    g = sr_graph(x4=x4_upscaler_checkpoint, hr_image=uploads["hr"], lr_image=uploads["lr"])
    # Where the blend mask is 0 the result is the known latent: the x4 VAE's encoding of the
    # original (VAEEncode of the same picture, run as a separate node).
    result, sampled, known = run_and_compare_known(comfy, g, HR // 4, MASK_BOX)
    inside = ~far_from_mask(HR // 4, MASK_BOX, 0)
    assert np.abs(sampled[0][:, inside].numpy() - known[0][:, inside].numpy()).mean() > 1e-2  # generated there
    assert_original_outside_blend(comfy.image(result, "save"), uploads["original"])


def test_tiled_sr_runs_in_tiles_and_keeps_the_known_latent(comfy, x4_upscaler_checkpoint, uploads):
    """128 px output, 96 px tiles (24 latent cells, 4 tiles), the original encoded with
    ComfyUI's tiled encoder: the keep region equals VAE Encode (Tiled) at its default tiles."""
    g = sr_graph(x4=x4_upscaler_checkpoint, hr_image=uploads["hr_small"], lr_image=uploads["lr_small"],
                 tile_size=96, blend=False, prefix="sr-tiled")
    _, sampled, _ = run_and_compare_known(comfy, g, HR // 8, SMALL_BOX)
    assert np.isfinite(sampled.numpy()).all()
    assert "HD-Painter SR: 4 tile(s) of up to 24x24 latent cells over a 32x32 latent" in comfy.log_text()


def test_region_sr_samples_only_the_hole_region_and_keeps_the_known_latent(comfy, x4_upscaler_checkpoint, uploads):
    """region=hole: the UNet runs on the box around the blend mask plus context only; the
    rest is the known latent, as in a full run; Poisson blend keeps the original outside."""
    g = sr_graph(x4=x4_upscaler_checkpoint, hr_image=uploads["hr"], lr_image=uploads["lr"], region="hole",
                 prefix="sr-region")
    result, sampled, known = run_and_compare_known(comfy, g, HR // 4, MASK_BOX)
    assert "HD-Painter SR: sampling 1 region(s) covering" in comfy.log_text()
    inside = ~far_from_mask(HR // 4, MASK_BOX, 0)
    assert np.abs(sampled[0][:, inside].numpy() - known[0][:, inside].numpy()).mean() > 1e-2
    assert_original_outside_blend(comfy.image(result, "save"), uploads["original"])


def _error(comfy, g):
    result = comfy.run(g.prompt(), timeout=600)
    assert not result.ok, "the prompt should have failed"
    return result


def test_hr_image_that_is_not_4x_the_inpainting_is_refused(comfy, x4_upscaler_checkpoint, uploads):
    g = sr_graph(x4=x4_upscaler_checkpoint, hr_image=uploads["hr"], lr_image=uploads["lr_wrong"])
    result = _error(comfy, g)
    assert "4x" in result.message and "256x256" in result.message, result.describe()


def test_mask_of_another_size_is_refused(comfy, x4_upscaler_checkpoint, uploads):
    g = sr_graph(x4=x4_upscaler_checkpoint, hr_image=uploads["hr"], lr_image=uploads["lr"], hr_scale=HR + 16)
    result = _error(comfy, g)
    assert result.error_node[1] == "HDPainter_SRSampler", result.describe()
    assert "mask is 256x256" in result.message and "272x272" in result.message, result.describe()


def test_a_model_that_is_not_the_x4_upscaler_is_refused(host, comfy, x4_upscaler_checkpoint, uploads):
    g = sr_graph(x4=x4_upscaler_checkpoint, hr_image=uploads["hr"], lr_image=uploads["lr"])
    sd15 = g.add("CheckpointLoaderSimple", _id="sd15", ckpt_name=host.checkpoint)
    for node in ("sigmas", "sample"):
        g.nodes[node]["inputs"]["model"] = sd15[0]
    result = _error(comfy, g)
    assert "x4 upscaler" in result.message and "SD15" in result.message, result.describe()


def test_a_vae_that_is_not_the_x4_upscalers_is_refused(host, comfy, x4_upscaler_checkpoint, uploads):
    g = sr_graph(x4=x4_upscaler_checkpoint, hr_image=uploads["hr"], lr_image=uploads["lr"])
    sd15 = g.add("CheckpointLoaderSimple", _id="sd15", ckpt_name=host.checkpoint)
    g.nodes["sampler"]["inputs"]["vae"] = sd15[2]
    result = _error(comfy, g)
    assert result.error_node[1] == "HDPainter_SRSampler", result.describe()
    assert "not the x4 upscaler's" in result.message and "scales by 8" in result.message, result.describe()


def test_poisson_blend_refuses_images_of_different_sizes(comfy, uploads):
    g = Graph()
    hr = g.add("LoadImage", _id="hr", image=uploads["hr"])
    lr = g.add("LoadImage", _id="lr", image=uploads["lr"])
    blend = g.add("ASUKA_PoissonBlend", _id="blend", original=hr[0], generated=lr[0], mask=hr[1],
                  padding=32, mask_grow=48)
    g.add("SaveImage", images=blend[0], filename_prefix=unique("blend-err"))
    result = _error(comfy, g)
    assert "same size" in result.message and "64x64" in result.message, result.describe()


# ------------------------------------------------------------------------------ example workflow

def test_hd_painter_2k_example_runs(host, comfy, x4_upscaler_checkpoint):
    """example_workflows/hd_painter_2k.json, converted as the frontend's Queue button does,
    runs end to end (512 inpainting -> x4 SR with known-latent blending -> Poisson blend) with
    the random test checkpoints, a 256 px original and 2-step schedules; outside the blend
    region the result is the original."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "scripts"))
    import workflows

    with open(workflows.path("hd_painter_2k")) as f:
        prompt = workflows.to_api_prompt(json.load(f), comfy.object_info())
    original = make_picture(HR, seed=31)
    image = comfy.upload_image(original, box_mask(HR, MASK_BOX))
    names = {workflows.SD15_CHECKPOINT: host.checkpoint, "x4-upscaler-ema.safetensors": x4_upscaler_checkpoint}
    save_id = None
    for node_id, node in prompt.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = names[inputs["ckpt_name"]]
        elif kind == "LoadImage":
            inputs["image"] = image
        elif kind in ("KSampler", "BasicScheduler"):
            inputs["steps"] = 2
        elif kind == "HDPainter_SRSampler":
            assert inputs["tile_size"] == 1152
            inputs["tile_size"] = 0          # a 256 px test picture fits in one piece
        elif kind == "SaveImage":
            inputs["filename_prefix"] = unique("hd-painter-2k")
            save_id = node_id
    result = comfy.run(prompt, timeout=900)
    assert result.ok, result.describe()
    assert_original_outside_blend(comfy.image(result, save_id), original)
