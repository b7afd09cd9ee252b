"""The pack's example workflows: one compact description each, turned into the
frontend's workflow format (``example_workflows/*.json``) and into API prompts.

    scripts/host.sh python scripts/workflows.py --server http://127.0.0.1:8188

writes ``example_workflows/<title>.json`` (see TITLES) from the live server's ``/object_info`` (so input
names, widget order and types always match the nodes). The host tests regenerate them the
same way, compare with the committed files, and run them as API prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
import sys
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW_DIR = os.path.join(REPO, "example_workflows")
sys.path.insert(0, REPO)
from asuka_core import model_sources  # noqa: E402  (pure data, no torch)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The bundled pictures (example_workflows/input/, copied into ComfyUI's input folder when the
# pack loads), each with the hole painted into its alpha channel; see scripts/example_images.py.
ASUKA_IMAGE = "asuka_example_512.webp"               # 512 x 512, the fir tree masked (to remove)
HD_PAINTER_IMAGE = "hd_painter_example_512.webp"     # 512 x 512, a patch of meadow masked
HD_PAINTER_IMAGE_2K = "hd_painter_example_2048.webp"  # the same at 2048 x 2048
HD_PAINTER_PROMPT = "a brown horse grazing"
SD15_CHECKPOINT = "sd-v1-5-inpainting.ckpt"

NOTE = (
    "ASUKA inpainting for SD1.5 (comfyui-asuka): fills the painted hole from the rest of the picture.\n\n"
    "Not runnable with public files alone: it needs an SD1.5 aligner, which nobody publishes (train "
    "one with the 'Train an ASUKA aligner' template). The bundled picture (512x512, the fir tree "
    "painted out) is in ComfyUI's input folder.\n\n"
    "Model files, all in ComfyUI/models/asuka:\n"
    "- mae_300.pth: the MAE prior, from the official ASUKA-FLUX.1-Fill release "
    "(Hugging Face yikaiwang/ASUKA-FLUX.1-Fill).\n"
    "- an SD1.5 aligner (.safetensors marked 'sd15'): NOT published by the ASUKA authors; it must "
    "be trained (see the pack's README). The released FLUX aligners do not work here.\n"
    "- a masked decoder: the public Asymmetric VQGAN decoders for SD1.5 "
    "(cross-attention/asymmetric-autoencoder-kl-x-1-5 or -x-2). No 4-channel ASUKA decoder is "
    "published.\n\n"
    "Checkpoint: your SD1.5 inpainting model (9-channel UNet). Sampler: cfg 1.0 (ASUKA runs "
    "without classifier-free guidance)."
)


@dataclass
class Node:
    type: str
    widgets: dict = field(default_factory=dict)   # widget name -> value
    links: dict = field(default_factory=dict)     # input name -> (node key, output slot)
    pos: tuple = (0, 0)
    title: str | None = None


def sd15_inpaint_graph() -> dict[str, Node]:
    """LoadImage -> MAE prior -> aligner conditioning -> InpaintModelConditioning -> KSampler
    -> masked decode -> SaveImage."""
    return {
        "ckpt": Node("CheckpointLoaderSimple", {"ckpt_name": SD15_CHECKPOINT}, pos=(0, 0)),
        "load": Node("LoadImage", {"image": ASUKA_IMAGE}, pos=(0, 160)),
        "mae_loader": Node("ASUKA_MAELoader", {"mae_name": "mae_300.pth"}, pos=(400, 0)),
        "prior": Node("ASUKA_MAEPrior", links={"mae": ("mae_loader", 0), "image": ("load", 0),
                                               "mask": ("load", 1)}, pos=(800, 0)),
        "aligner_loader": Node("ASUKA_AlignerLoader", {"aligner_name": "asuka_sd15_aligner.safetensors"},
                               pos=(400, 140)),
        "cond": Node("ASUKA_AlignerConditioning", {"strength": 1.0},
                     links={"aligner": ("aligner_loader", 0), "prior": ("prior", 0)}, pos=(1200, 0)),
        "inpaint": Node("InpaintModelConditioning", {"noise_mask": True},
                        links={"positive": ("cond", 0), "negative": ("cond", 1), "vae": ("ckpt", 2),
                               "pixels": ("load", 0), "mask": ("load", 1)}, pos=(1200, 180)),
        "sampler": Node("KSampler", {"seed": 42, "steps": 30, "cfg": 1.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0},
                        links={"model": ("ckpt", 0), "positive": ("inpaint", 0), "negative": ("inpaint", 1),
                               "latent_image": ("inpaint", 2)}, pos=(1600, 0)),
        "decoder_loader": Node("ASUKA_DecoderLoader",
                               {"decoder_name": "asymmetric-autoencoder-kl-x-1-5.safetensors"}, pos=(2000, 0)),
        "decode": Node("ASUKA_MaskedDecode", {"composite": True, "tile_size": 0, "tile_overlap": 64,
                                              "region": "full"},
                       links={"decoder": ("decoder_loader", 0), "samples": ("sampler", 0), "image": ("load", 0),
                              "mask": ("load", 1)}, pos=(2000, 140)),
        "save": Node("SaveImage", {"filename_prefix": "asuka"}, links={"images": ("decode", 0)}, pos=(2400, 0)),
        "preview": Node("PreviewImage", links={"images": ("prior", 1)}, pos=(800, 200),
                        title="MAE reconstruction (what the prior sees)"),
    }


WORKFLOWS = {"asuka_sd15_inpaint": (sd15_inpaint_graph, NOTE)}


FLUX_NOTE = (
    "ASUKA inpainting on FLUX.1-Fill-dev with the official ASUKA weights (comfyui-asuka): removes "
    "what is painted over and fills the hole so that it matches the rest of the picture.\n\n"
    "Press Run on the bundled picture (512x512, the fir tree painted out) once the files below are in "
    "place; ComfyUI lists the missing ones with their links when the template opens.\n\n"
    "ComfyUI/models/asuka: mae_300.pth, asuka_alignment_clip.pt, asuka_alignment_t5.pt, "
    "asuka_decoder.ckpt (Hugging Face yikaiwang/ASUKA-FLUX.1-Fill).\n"
    "ComfyUI/models/diffusion_models: flux1-fill-dev.safetensors (or an fp8 copy; weight_dtype "
    "fp8_e4m3fn on 12-16 GB GPUs). models/vae: ae.safetensors. models/text_encoders: clip_l + t5xxl "
    "(only to encode the empty prompt once: the official blend reference).\n\n"
    "For your own picture, paint the hole in LoadImage's mask editor. Image sides: multiples of 16; ASUKA was tested at "
    "512 and 1024. Official settings: weight 0.5 toward the empty prompt, guidance 30, 50 euler "
    "steps, simple schedule, shift for the image size (ModelSamplingFlux), cfg 1.0, "
    "noise_mask off. weight 1.0 = pure prior (the paper) and needs no text encoder: then delete "
    "the two text nodes."
)


def flux_fill_graph() -> dict[str, Node]:
    """LoadImage -> MAE prior -> FLUX conditioning (both aligners, empty prompt) ->
    InpaintModelConditioning -> KSampler (FLUX.1-Fill, shift for the image size) -> ASUKA
    masked decode -> SaveImage."""
    return {
        "load": Node("LoadImage", {"image": ASUKA_IMAGE}, pos=(0, 0)),
        "unet": Node("UNETLoader", {"unet_name": "flux1-fill-dev.safetensors", "weight_dtype": "default"},
                     pos=(0, 420)),
        "size": Node("GetImageSize", links={"image": ("load", 0)}, pos=(400, 420)),
        "shift": Node("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5},
                      links={"model": ("unet", 0), "width": ("size", 0), "height": ("size", 1)}, pos=(800, 420),
                      title="ModelSamplingFlux (shift for the image size)"),
        "mae_loader": Node("ASUKA_MAELoader", {"mae_name": "mae_300.pth"}, pos=(400, 0)),
        "prior": Node("ASUKA_MAEPrior", links={"mae": ("mae_loader", 0), "image": ("load", 0),
                                               "mask": ("load", 1)}, pos=(800, 0)),
        "clip_aligner": Node("ASUKA_AlignerLoader", {"aligner_name": "asuka_alignment_clip.pt"}, pos=(400, 130)),
        "t5_aligner": Node("ASUKA_AlignerLoader", {"aligner_name": "asuka_alignment_t5.pt"}, pos=(400, 260)),
        "text_encoders": Node("DualCLIPLoader", {"clip_name1": "t5xxl_fp16.safetensors",
                                                 "clip_name2": "clip_l.safetensors", "type": "flux"},
                              pos=(800, 640)),
        "empty": Node("CLIPTextEncode", {"text": ""}, links={"clip": ("text_encoders", 0)}, pos=(1200, 640),
                      title="Empty prompt (blend reference)"),
        "cond": Node("ASUKA_FluxConditioning", {"weight": 0.5, "guidance": 30.0},
                     links={"prior": ("prior", 0), "clip_aligner": ("clip_aligner", 0),
                            "t5_aligner": ("t5_aligner", 0), "empty": ("empty", 0)}, pos=(1200, 0)),
        "vae": Node("VAELoader", {"vae_name": "ae.safetensors"}, pos=(800, 250)),
        "inpaint": Node("InpaintModelConditioning", {"noise_mask": False},
                        links={"positive": ("cond", 0), "negative": ("cond", 0), "vae": ("vae", 0),
                               "pixels": ("load", 0), "mask": ("load", 1)}, pos=(1200, 220)),
        "sampler": Node("KSampler", {"seed": 42, "steps": 50, "cfg": 1.0, "sampler_name": "euler",
                                     "scheduler": "simple", "denoise": 1.0},
                        links={"model": ("shift", 0), "positive": ("inpaint", 0), "negative": ("inpaint", 1),
                               "latent_image": ("inpaint", 2)}, pos=(1600, 0)),
        "decoder_loader": Node("ASUKA_DecoderLoader", {"decoder_name": "asuka_decoder.ckpt"}, pos=(2000, 250)),
        "decode": Node("ASUKA_MaskedDecode", {"composite": True, "tile_size": 0, "tile_overlap": 64,
                                              "region": "full"},
                       links={"decoder": ("decoder_loader", 0), "samples": ("sampler", 0), "image": ("load", 0),
                              "mask": ("load", 1)}, pos=(2000, 0)),
        "save": Node("SaveImage", {"filename_prefix": "asuka_flux"}, links={"images": ("decode", 0)},
                     pos=(2400, 0)),
        "preview": Node("PreviewImage", links={"images": ("prior", 1)}, pos=(1600, 420),
                        title="MAE reconstruction (what the prior sees)"),
    }


WORKFLOWS["asuka_flux_fill"] = (flux_fill_graph, FLUX_NOTE)


HD_PAINTER_2K_NOTE = (
    "HD-Painter 2K inpainting (comfyui-asuka): paints what the prompt describes into the hole of a "
    "2048 px photo.\n\n"
    "The bundled picture is 2048x2048 with a patch of meadow painted out; the prompt asks for a "
    "horse.\n\n"
    "1. 512 stage: the original is scaled by 1/4 and inpainted with an SD1.5 inpainting model "
    "(sd-v1-5-inpainting or similar, in models/checkpoints).\n"
    "2. SR stage: the Stable Diffusion x4 upscaler (stabilityai/stable-diffusion-x4-upscaler, "
    "x4-upscaler-ema.safetensors, in models/checkpoints) upscales the 512 result; the HD-Painter "
    "SR Sampler keeps the original's latent outside the (grown, blurred) mask at every step. "
    "HD-Painter's settings: noise_augmentation 0.057 (level 20 of 350), cfg 7.5, 'simple' "
    "schedule, 20 steps, prompt + ', high resolution professional photo', empty negative.\n"
    "3. Poisson Blend pastes the result into the original without a seam.\n\n"
    "The original's sides must be multiples of 32 (the bundled picture: 2048x2048) so that it is exactly 4x the "
    "512 picture. tile_size 1152 (4 tiles at 2048) bounds memory at 2K (see docs/super-resolution.md)."
)


def hd_painter_2k_graph() -> dict[str, Node]:
    """LoadImage -> 1/4 scale -> SD1.5 inpainting (KSampler) -> VAEDecode (512) ->
    SD_4XUpscale_Conditioning + HDPainter_SRSampler -> SamplerCustom -> VAEDecodeTiled
    -> ASUKA_PoissonBlend (into the original) -> SaveImage."""
    prompt = HD_PAINTER_PROMPT
    return {
        "load": Node("LoadImage", {"image": HD_PAINTER_IMAGE_2K}, pos=(0, 200)),
        "ckpt": Node("CheckpointLoaderSimple", {"ckpt_name": SD15_CHECKPOINT}, pos=(0, 0)),
        "small": Node("ImageScaleBy", {"upscale_method": "area", "scale_by": 0.25},
                      links={"image": ("load", 0)}, pos=(400, 300)),
        "pos": Node("CLIPTextEncode", {"text": prompt}, links={"clip": ("ckpt", 1)}, pos=(400, 0),
                    title="Prompt (512 stage)"),
        "neg": Node("CLIPTextEncode", {"text": ""}, links={"clip": ("ckpt", 1)}, pos=(400, 150)),
        "inpaint": Node("InpaintModelConditioning", {"noise_mask": True},
                        links={"positive": ("pos", 0), "negative": ("neg", 0), "vae": ("ckpt", 2),
                               "pixels": ("small", 0), "mask": ("load", 1)}, pos=(800, 0)),
        "sampler": Node("KSampler", {"seed": 1, "steps": 50, "cfg": 7.5, "sampler_name": "ddim",
                                     "scheduler": "simple", "denoise": 1.0},
                        links={"model": ("ckpt", 0), "positive": ("inpaint", 0), "negative": ("inpaint", 1),
                               "latent_image": ("inpaint", 2)}, pos=(1200, 0)),
        "decode512": Node("VAEDecode", links={"samples": ("sampler", 0), "vae": ("ckpt", 2)}, pos=(1600, 0)),
        "x4": Node("CheckpointLoaderSimple", {"ckpt_name": "x4-upscaler-ema.safetensors"}, pos=(0, 900)),
        "x4_pos": Node("CLIPTextEncode", {"text": prompt + ", high resolution professional photo"},
                       links={"clip": ("x4", 1)}, pos=(400, 900), title="Prompt (x4 stage)"),
        "x4_neg": Node("CLIPTextEncode", {"text": ""}, links={"clip": ("x4", 1)}, pos=(400, 1060)),
        "x4_cond": Node("SD_4XUpscale_Conditioning", {"scale_ratio": 4.0, "noise_augmentation": 0.057},
                        links={"images": ("decode512", 0), "positive": ("x4_pos", 0), "negative": ("x4_neg", 0)},
                        pos=(1600, 200)),
        "sr_sampler": Node("HDPainter_SRSampler", {"mask_grow": 19, "mask_blur": 19, "tile_size": 1152,
                                                        "tile_overlap": 128, "region": "auto"},
                           links={"vae": ("x4", 2), "image": ("load", 0), "mask": ("load", 1)}, pos=(800, 600)),
        "sigmas": Node("BasicScheduler", {"scheduler": "simple", "steps": 20, "denoise": 1.0},
                       links={"model": ("x4", 0)}, pos=(800, 860)),
        "sr": Node("SamplerCustom", {"add_noise": True, "noise_seed": 1, "cfg": 7.5},
                   links={"model": ("x4", 0), "positive": ("x4_cond", 0), "negative": ("x4_cond", 1),
                          "sampler": ("sr_sampler", 0), "sigmas": ("sigmas", 0), "latent_image": ("x4_cond", 2)},
                   pos=(2000, 200)),
        "decode2k": Node("VAEDecodeTiled", {"tile_size": 512, "overlap": 64, "temporal_size": 64,
                                            "temporal_overlap": 8},
                         links={"samples": ("sr", 0), "vae": ("x4", 2)}, pos=(2400, 200)),
        "blend": Node("ASUKA_PoissonBlend", {"padding": 32, "mask_grow": 48},
                      links={"original": ("load", 0), "generated": ("decode2k", 0), "mask": ("load", 1)},
                      pos=(2400, 500)),
        "save": Node("SaveImage", {"filename_prefix": "hd_painter_2k"}, links={"images": ("blend", 0)},
                     pos=(2800, 200)),
        "preview512": Node("PreviewImage", links={"images": ("decode512", 0)}, pos=(2000, 0),
                           title="512 inpainting"),
    }


WORKFLOWS["hd_painter_2k"] = (hd_painter_2k_graph, HD_PAINTER_2K_NOTE)


HD_PAINTER_NOTE = (
    "HD-Painter for SD1.5 inpainting (comfyui-asuka): paints what the prompt describes into the hole, "
    "following the prompt more closely than plain inpainting (PAIntA + RASG, no training).\n\n"
    "The bundled picture is 512x512 with a patch of meadow painted out; the prompt asks for a horse.\n"
    "Checkpoint: any SD1.5 inpainting model (9-channel UNet), e.g. sd-v1-5-inpainting or "
    "DreamShaper 8 inpainting (the official HD-Painter default). SD2/SDXL are not supported.\n"
    "Load an image whose alpha (or a painted mask) marks the hole; describe what goes there in "
    "'HD-Painter Prompt'.\n\n"
    "Official settings: 50 steps, 'simple' scheduler, cfg 7.5, RASG eta 0.1 (sigma_mode "
    "official_code), PAIntA while t > 500. Each RASG step runs a backward pass through the UNet "
    "(more time and memory than a plain step: see docs/benchmarks.md); for a quick look, plug a "
    "normal sampler (KSamplerSelect) into SamplerCustom instead and keep PAIntA."
)


def hd_painter_graph() -> dict[str, Node]:
    """Checkpoint -> HD-Painter Prompt + negative -> InpaintModelConditioning; model -> PAIntA;
    SamplerCustom with the RASG sampler and the simple schedule -> VAEDecode -> SaveImage."""
    return {
        "ckpt": Node("CheckpointLoaderSimple", {"ckpt_name": SD15_CHECKPOINT}, pos=(0, 0)),
        "load": Node("LoadImage", {"image": HD_PAINTER_IMAGE}, pos=(0, 180)),
        "prompt": Node("HDPainter_PromptTokens", {"text": HD_PAINTER_PROMPT},
                       links={"clip": ("ckpt", 1)}, pos=(400, 0)),
        "negative": Node("CLIPTextEncode", {"text": "text, bad anatomy, bad proportions, blurry, cropped, "
                                                    "deformed, disfigured, duplicate, error, low quality, "
                                                    "worst quality, watermark"},
                         links={"clip": ("ckpt", 1)}, pos=(400, 220), title="Negative prompt"),
        "inpaint": Node("InpaintModelConditioning", {"noise_mask": True},
                        links={"positive": ("prompt", 0), "negative": ("negative", 0), "vae": ("ckpt", 2),
                               "pixels": ("load", 0), "mask": ("load", 1)}, pos=(800, 180)),
        "painta": Node("HDPainter_PAIntA", {"end_timestep": 500},
                       links={"model": ("ckpt", 0), "tokens": ("prompt", 1)}, pos=(800, 0)),
        "rasg": Node("HDPainter_RASGSampler", {"eta": 0.1, "sigma_mode": "official_code"},
                     links={"tokens": ("prompt", 1)}, pos=(1200, 360)),
        "sigmas": Node("BasicScheduler", {"scheduler": "simple", "steps": 50, "denoise": 1.0},
                       links={"model": ("painta", 0)}, pos=(1200, 520)),
        "sampler": Node("SamplerCustom", {"add_noise": True, "noise_seed": 1, "cfg": 7.5},
                        links={"model": ("painta", 0), "positive": ("inpaint", 0), "negative": ("inpaint", 1),
                               "sampler": ("rasg", 0), "sigmas": ("sigmas", 0),
                               "latent_image": ("inpaint", 2)}, pos=(1600, 0)),
        "decode": Node("VAEDecode", links={"samples": ("sampler", 0), "vae": ("ckpt", 2)}, pos=(2000, 0)),
        "save": Node("SaveImage", {"filename_prefix": "hd_painter"}, links={"images": ("decode", 0)},
                     pos=(2000, 140)),
    }


WORKFLOWS["hd_painter_sd15"] = (hd_painter_graph, HD_PAINTER_NOTE)


# --- aligner training (docs/training.md) ----------------------------------------------

TRAIN_NOTE = (
    "Train an SD1.5 ASUKA aligner inside ComfyUI (comfyui-asuka)\n\n"
    "No SD1.5 aligner is published, so this graph makes one: 'Train ASUKA Aligner' trains for the "
    "given steps on a folder of your photos (in ComfyUI/input/asuka_photos, or an absolute path), "
    "with your SD1.5 inpainting checkpoint frozen, then the rest of the graph inpaints the loaded "
    "picture with the freshly trained aligner.\n\n"
    "It blocks the queue while it trains; Cancel stops it and keeps a resumable state (switch "
    "'resume' on to continue). The aligner is saved to models/asuka/<run_name>.safetensors, the "
    "run (loss curve, sample images, state) to output/asuka_training/<run_name>/.\n\n"
    "A useful aligner needs a GPU, hundreds to thousands of photos and many thousand steps: see "
    "docs/training.md. For long runs the command line (scripts/host.sh train-aligner) is easier."
)


def sd15_train_aligner_graph() -> dict[str, Node]:
    """Checkpoint + MAE -> ASUKA_TrainAligner -> (its aligner) the SD1.5 ASUKA graph; loss curve preview."""
    g = sd15_inpaint_graph()
    del g["aligner_loader"]
    g["train"] = Node("ASUKA_TrainAligner", {"images_folder": "asuka_photos", "steps": 1000},
                      links={"model": ("ckpt", 0), "vae": ("ckpt", 2), "mae": ("mae_loader", 0)}, pos=(800, 380))
    g["cond"].links["aligner"] = ("train", 0)
    g["curve"] = Node("PreviewImage", links={"images": ("train", 1)}, pos=(1200, 380), title="Loss curve")
    return g


WORKFLOWS["asuka_sd15_train_aligner"] = (sd15_train_aligner_graph, TRAIN_NOTE)


# --- masked-decoder training (docs/training.md) ---------------------------------------

TRAIN_DECODER_NOTE = (
    "Train an SD1.5 ASUKA masked decoder inside ComfyUI (comfyui-asuka)\n\n"
    "No 4-channel ASUKA decoder is published, so this graph makes one: 'Train ASUKA Masked Decoder' "
    "fine-tunes the Asymmetric VQGAN decoder (models/asuka) on a folder of your photos (in "
    "ComfyUI/input/asuka_photos, or an absolute path) with ASUKA's colour and latent augmentation, "
    "your SD1.5 inpainting checkpoint frozen, then the rest of the graph inpaints the loaded picture "
    "and decodes it with the freshly trained decoder.\n\n"
    "LPIPS needs two weight files you put in models/asuka (the node's tooltips name them); nothing "
    "is downloaded. It blocks the queue while it trains; Cancel stops it and keeps a resumable "
    "state. The decoder is saved to models/asuka/<run_name>.safetensors, the run to "
    "output/asuka_training/<run_name>/.\n\n"
    "A useful decoder needs a GPU and many thousand steps: see docs/training.md. For long runs the "
    "command line (scripts/host.sh train-decoder) is easier. This graph also needs an SD1.5 aligner "
    "you trained (graph 5)."
)


def sd15_train_decoder_graph() -> dict[str, Node]:
    """Checkpoint -> ASUKA_TrainDecoder -> (its decoder) the SD1.5 ASUKA graph; loss curve preview."""
    g = sd15_inpaint_graph()
    start = g.pop("decoder_loader").widgets["decoder_name"]
    g["train"] = Node("ASUKA_TrainDecoder", {"start_decoder": start, "images_folder": "asuka_photos",
                                             "steps": 1000},
                      links={"model": ("ckpt", 0), "vae": ("ckpt", 2), "clip": ("ckpt", 1)}, pos=(2000, 380))
    g["decode"].links["decoder"] = ("train", 0)
    g["curve"] = Node("PreviewImage", links={"images": ("train", 1)}, pos=(2400, 380), title="Loss curve")
    return g


WORKFLOWS["asuka_sd15_train_decoder"] = (sd15_train_decoder_graph, TRAIN_DECODER_NOTE)


# --------------------------------------------------------------------------------------


def _inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name]))
    return out


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _widget_values(info: dict, node: Node) -> list:
    """Widget values in the order the frontend stores them (seed-like inputs carry an extra
    'control after generate' value, image uploads an extra 'image' value)."""
    values = []
    for name, spec in _inputs(info):
        if not _is_widget(spec) or name in node.links:
            continue
        opts = spec[1] if len(spec) > 1 else {}
        if name in node.widgets:
            value = node.widgets[name]
        elif "default" in opts:
            value = opts["default"]
        elif isinstance(spec[0], list) and spec[0]:
            value = spec[0][0]
        else:
            value = (opts.get("options") or [None])[0]
        values.append(value)
        if opts.get("control_after_generate"):
            values.append("fixed")
        if opts.get("image_upload"):
            values.append("image")
    return values


def _model_metadata(node: Node) -> list[dict]:
    """The frontend's model metadata of a loader node ({name, url, directory} per file it
    loads), from the pack's one table of model sources: ComfyUI's missing-models dialog
    lists what is not installed, with its download."""
    out = []
    for name, folder in model_sources.LOADER_INPUTS.get(node.type, {}).items():
        meta = model_sources.workflow_metadata(node.widgets.get(name, ""), folder)
        if meta:
            out.append(meta)
    return out


def to_ui_workflow(graph: dict[str, Node], object_info: dict, note: str | None = None) -> dict:
    ids = {key: i + 1 for i, key in enumerate(graph)}
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for key, node in graph.items():
        info = object_info[node.type]
        for name, (src, slot) in node.links.items():
            link_id = len(links) + 1
            src_type = object_info[graph[src].type]["output"][slot]
            links.append([link_id, ids[src], slot, ids[key], None, src_type, name])
            out_links.setdefault((ids[src], slot), []).append(link_id)
    for order, (key, node) in enumerate(graph.items()):
        info = object_info[node.type]
        socket_inputs = []
        for name, spec in _inputs(info):
            if _is_widget(spec) and name not in node.links:
                continue
            link = next((lk for lk in links if lk[3] == ids[key] and lk[6] == name), None)
            if link is not None:
                link[4] = len(socket_inputs)
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            socket_inputs.append({"name": name, "type": kind, "link": link[0] if link else None})
        outputs = [
            {"name": name, "type": kind, "links": out_links.get((ids[key], slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))
        ]
        ui = {
            "id": ids[key], "type": node.type, "pos": list(node.pos), "size": [320, 120],
            "flags": {}, "order": order, "mode": 0, "inputs": socket_inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node.type},
            "widgets_values": _widget_values(info, node),
        }
        models = _model_metadata(node)
        if models:
            ui["properties"]["models"] = models
        if node.title:
            ui["title"] = node.title
        ui_nodes.append(ui)
    if note:
        nid = len(ui_nodes) + 1
        ui_nodes.append({"id": nid, "type": "Note", "pos": [0, 560], "size": [760, 260], "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {}, "widgets_values": [note]})
    return {
        "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes,
        "links": [lk[:6] for lk in links], "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """The frontend's 'Queue' conversion, for nodes the server knows (Notes are skipped)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for ui in workflow["nodes"]:
        info = object_info.get(ui["type"])
        if info is None:
            continue
        inputs = {}
        linked = {inp["name"]: links[inp["link"]] for inp in ui["inputs"] if inp.get("link") is not None}
        values = list(ui.get("widgets_values", []))
        for name, spec in _inputs(info):
            if name in linked:
                lk = linked[name]
                inputs[name] = [str(lk[1]), lk[2]]
            elif _is_widget(spec):
                opts = spec[1] if len(spec) > 1 else {}
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate") or opts.get("image_upload"):
                    values.pop(0)
        prompt[str(ui["id"])] = {"class_type": ui["type"], "inputs": inputs}
    return prompt


def fetch_object_info(server: str) -> dict:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as r:
        return json.load(r)


# ComfyUI's template browser (frontend 1.32 and 1.48) shows a pack's workflow file names as
# their titles, and repeats them as descriptions: so each file is named by its title, in plain
# words, numbered in the order a new user should try them (web/js/asuka.js sorts the pack's
# list, which ComfyUI gives in the folder's order).
# No characters that Windows forbids in file names.
TITLES = {
    "asuka_flux_fill": "1. Remove an object with ASUKA on FLUX.1-Fill",
    "hd_painter_sd15": "2. Paint a prompt into a hole with HD-Painter (SD1.5)",
    "hd_painter_2k": "3. HD-Painter 2K, paint a prompt into a 2048 px photo",
    "asuka_sd15_inpaint": "4. ASUKA on SD1.5 (needs an aligner you trained)",
    "asuka_sd15_train_aligner": "5. Train an ASUKA aligner for SD1.5",
    "asuka_sd15_train_decoder": "6. Train an ASUKA masked decoder for SD1.5",
}


def path(name: str, ext: str = ".json") -> str:
    """The file of workflow ``name`` (a key of WORKFLOWS): its title, or the key itself."""
    return os.path.join(WORKFLOW_DIR, TITLES.get(name, name) + ext)


def load(name: str) -> dict:
    with open(path(name), encoding="utf-8") as f:
        return json.load(f)


def render_all(object_info: dict) -> dict[str, dict]:
    return {name: to_ui_workflow(make(), object_info, note) for name, (make, note) in WORKFLOWS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    args = parser.parse_args()
    for name, workflow in render_all(fetch_object_info(args.server)).items():
        target = path(name)
        with open(target, "w", encoding="utf-8") as f:
            json.dump(workflow, f, indent=1)
            f.write("\n")
        print("wrote", os.path.relpath(target, REPO))


if __name__ == "__main__":
    main()
