"""Nodes for HD-Painter's inpainting-specialised x4 super-resolution:
HDPainter_SRSampler (known-latent blending sampler for the SD x4 upscaler) and
ASUKA_PoissonBlend (the final gradient-domain blend into the original).

Thin glue: the maths is in ``asuka_core.super_resolution`` and ``asuka_core.poisson``.
"""

from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.samplers
from comfy_api.latest import io

from ..asuka_core import super_resolution as sr
from ..asuka_core.errors import InputError
from ..asuka_core.imaging import to_image_batch, to_mask_batch
from ..asuka_core.poisson import blend_images, check_mask_size
from ..asuka_core.tiling import MIN_TILE, region_share, tile_grid
from . import common
from .types import HD_PAINTER_CATEGORY

SR_CATEGORY = HD_PAINTER_CATEGORY
MIN_TILE_PX = MIN_TILE * sr.SCALE
VAE_TILE, VAE_TILE_OVERLAP = 512, 64  # pixels: tiles for encoding the original when tile_size > 0


def _tiled_model_function(tile: int | None, overlap: int, previous, boxes=None, known=None):
    """A ``model_function_wrapper`` that runs the UNet on overlapping latent tiles, cropping
    every conditioning tensor laid out like the latent (the x4 upscaler's ``c_concat``).
    With ``boxes`` (``sr.sr_regions``) only those are run and the prediction elsewhere is
    the ``known`` latent (model space), which the blend keeps there anyway."""
    def wrapper(apply_model, args):
        x, timestep, c = args["input"], args["timestep"], args["c"]
        if c.get("control") is not None:
            raise InputError("tiled or region upscaling cannot be combined with a ControlNet: set tile_size "
                             "to 0 and region to full.")
        spatial = {k: v for k, v in c.items()
                   if isinstance(v, torch.Tensor) and v.ndim == x.ndim and v.shape[-2:] == x.shape[-2:]}
        rest = {k: v for k, v in c.items() if k not in spatial}

        def run(x_tile, crops):
            tile_c = {**rest, **crops}
            if previous is not None:
                return previous(apply_model, {**args, "input": x_tile, "c": tile_c})
            return apply_model(x_tile, timestep, **tile_c)

        fill = None
        if boxes is not None:  # the CFG batch stacks whole copies of the latent batch
            fill = known.to(x.device, x.dtype)
            if fill.shape[0] not in (1, x.shape[0]):
                fill = fill.repeat(x.shape[0] // fill.shape[0], 1, 1, 1)
        return sr.run_tiled(run, x, spatial, tile=tile, overlap=overlap,
                            on_tile=mm.throw_exception_if_processing_interrupted, boxes=boxes, fill=fill)
    return wrapper


def _sample_sr(model, x, sigmas, extra_args=None, callback=None, disable=None, *, known_latent, mask,
               tile=None, overlap=0, region="full"):
    """KSAMPLER function: checks the model, scales the known latent into the model's space,
    installs the tile wrapper, then runs asuka_core's known-latent blending loop."""
    base = model.inner_model.inner_model
    if not isinstance(base, comfy.model_base.SD_X4Upscaler):
        raise InputError(
            f"the HD-Painter SR sampler needs the Stable Diffusion x4 upscaler (x4-upscaler-ema.safetensors "
            f"loaded with Load Checkpoint), but the model given to the sampler is a {type(base).__name__} "
            f"({type(base.model_config).__name__}). Connect the x4 upscaler's MODEL.")
    known = base.process_latent_in(known_latent.to(x.device, x.dtype))
    extra_args = dict(extra_args or {})
    boxes = sr.sr_regions(mask, region)
    if boxes is not None:
        common.log.info("HD-Painter SR: sampling %d region(s) covering %.0f%% of the %dx%d latent", len(boxes),
                        100 * region_share(boxes, x.shape[-2], x.shape[-1]), x.shape[-1], x.shape[-2])
    if tile is not None:
        grid = tile_grid(x.shape[-2], x.shape[-1], tile, overlap)
        common.log.info("HD-Painter SR: %d tile(s) of up to %dx%d latent cells over a %dx%d latent",
                        len(grid.tiles), tile, tile, x.shape[-1], x.shape[-2])
    if tile is not None or boxes is not None:
        options = dict(extra_args.get("model_options") or {})
        options["model_function_wrapper"] = _tiled_model_function(
            tile, overlap, options.get("model_function_wrapper"), boxes=boxes, known=known)
        extra_args["model_options"] = options
    return sr.sample_known_latent_blend(model, x, sigmas, extra_args, callback, disable, known=known, mask=mask)


class HDPainterSRSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HDPainter_SRSampler",
            display_name="HD-Painter SR Sampler (x4, known-latent blend)",
            category=SR_CATEGORY,
            description=(
                "Upscales an inpainted picture 4x while keeping the real detail of the original outside the "
                "hole. "
                "A sampler for SamplerCustom that runs the Stable Diffusion x4 upscaler the HD-Painter way: at "
                "every step the prediction outside the (grown, blurred) mask is replaced by the latent of the "
                "high-resolution original, so untouched areas keep their real detail and only the filled "
                "area is generated at 4x. Use with SD 4X Upscale Conditioning (noise_augmentation 0.057), "
                "cfg 7.5 and BasicScheduler 'simple', 20 steps (HD-Painter's settings)."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The x4 upscaler's VAE (from Load Checkpoint with x4-upscaler-ema)."),
                io.Image.Input("image", tooltip=(
                    "The original picture at the output size: exactly 4x the inpainted picture that goes into "
                    "SD 4X Upscale Conditioning (e.g. 2048 for a 512 inpainting).")),
                io.Mask.Input("mask", tooltip="1 = the inpainted area, at the size of image."),
                io.Int.Input("mask_grow", default=sr.DILATION, min=0, max=256, tooltip=(
                    "Pixels the mask is grown by (diamond) before it is shrunk to latent size (HD-Painter: 19).")),
                io.Int.Input("mask_blur", default=sr.BLUR_KERNEL, min=1, max=99, step=2, tooltip=(
                    "Taps of the Gaussian blur of the latent-size mask, odd (HD-Painter: 19); 1 = no blur.")),
                io.Int.Input("tile_size", default=0, min=0, max=8192, step=32, tooltip=(
                    "0 = upscale in one piece. Otherwise the UNet's tile side in output pixels (e.g. 1152 for "
                    f"2048 px: 4 tiles), to bound memory at 2K and above (at least {MIN_TILE_PX}; tiles approximate "
                    "the one-piece result, see docs/super-resolution.md). The original is then also encoded in "
                    "512 px tiles.")),
                io.Int.Input("tile_overlap", default=128, min=0, max=2048, step=32, tooltip=(
                    "Overlap between tiles in output pixels; tiles cross-fade over it.")),
                io.Combo.Input("region", options=["auto", "full", "hole"], default="auto", optional=True, tooltip=(
                    "Which part the upscaler samples. Outside the grown, blurred mask the result is the "
                    "original anyway. auto: only the mask's area plus 64 px of context when that is at most "
                    "half the picture, otherwise all of it. full: the whole picture (HD-Painter's way). "
                    "hole: always only the mask's area and context. The region sees less of the picture, so "
                    "it approximates the full result; see docs/super-resolution.md.")),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="Connect to SamplerCustom's sampler input.")],
        )

    @classmethod
    def execute(cls, vae, image, mask, mask_grow: int, mask_blur: int, tile_size: int,
                tile_overlap: int, region: str = "auto") -> io.NodeOutput:
        image, mask = to_image_batch(image), to_mask_batch(mask)
        if getattr(vae, "downscale_ratio", None) != sr.SCALE or getattr(vae, "latent_channels", None) != 4:
            raise InputError(
                f"this VAE is not the x4 upscaler's (it scales by {getattr(vae, 'downscale_ratio', '?')}, "
                f"{getattr(vae, 'latent_channels', '?')} latent channels; the x4 upscaler's scales by 4 with 4 "
                "channels): connect the VAE output of Load Checkpoint with x4-upscaler-ema.safetensors.")
        check_mask_size(mask, image)
        if image.shape[1] % sr.SCALE or image.shape[2] % sr.SCALE:
            raise InputError(f"the image is {image.shape[2]}x{image.shape[1]}: both sides must be multiples of 4 "
                             "(it must be exactly 4x the inpainted picture).")
        if 0 < tile_size < MIN_TILE_PX:
            raise InputError(f"tile_size {tile_size} px is too small: use 0 (no tiling) or at least {MIN_TILE_PX} px.")
        if mask_blur % 2 == 0:
            raise InputError(f"mask_blur {mask_blur} must be odd (e.g. 19).")
        if tile_size:  # ComfyUI's own tiled encoder, with VAE Encode (Tiled)'s default tiles
            known = vae.encode_tiled(image, tile_x=VAE_TILE, tile_y=VAE_TILE, overlap=VAE_TILE_OVERLAP)
        else:
            known = vae.encode(image)
        known = known.to(common.intermediate_device())
        m = sr.blend_mask(mask, tuple(known.shape[-2:]), dilation=mask_grow, blur=mask_blur)
        options = {"known_latent": known, "mask": m,
                   "tile": tile_size // sr.SCALE or None, "overlap": tile_overlap // sr.SCALE, "region": region}
        return io.NodeOutput(comfy.samplers.KSAMPLER(_sample_sr, extra_options=options))


class PoissonBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_PoissonBlend",
            display_name="Poisson Blend (HD-Painter)",
            category=SR_CATEGORY,
            description=(
                "Pastes the upscaled fill into the original picture so that colours and brightness meet "
                "without a seam. "
                "Pastes the regenerated area of an upscaled inpainting into the original picture in the "
                "gradient domain, so colours and brightness meet without a seam (HD-Painter's last step; "
                "the same result as OpenCV's seamlessClone NORMAL_CLONE, without needing OpenCV). "
                "Everything outside the bounding box of the grown mask stays exactly the original."
            ),
            inputs=[
                io.Image.Input("original", tooltip="The original picture (e.g. at 2048 px)."),
                io.Image.Input("generated", tooltip=(
                    "The upscaled inpainting, the same size as the original (e.g. the x4 upscaler's "
                    "decoded output).")),
                io.Mask.Input("mask", tooltip="1 = the regenerated area; the original picture's mask, at its size."),
                io.Int.Input("padding", default=32, min=0, max=512, tooltip=(
                    "Pixels of reflected border added around both pictures before blending, filled from "
                    "the generated picture (HD-Painter: 32). Lets a mask that touches the edge blend too.")),
                io.Int.Input("mask_grow", default=48, min=1, max=512, tooltip=(
                    "Side in pixels of the square the mask is grown with before blending, so the seam "
                    "falls on original pixels (HD-Painter: 48).")),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The blended picture.")],
        )

    @classmethod
    def execute(cls, original, generated, mask, padding: int, mask_grow: int) -> io.NodeOutput:
        out = blend_images(original, generated, mask, pad=padding, dilation=mask_grow)
        return io.NodeOutput(out.to(common.intermediate_device()))


NODES = [HDPainterSRSampler, PoissonBlend]
