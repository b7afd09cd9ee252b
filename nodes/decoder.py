"""Nodes for the masked decoders: ASUKA_DecoderLoader, ASUKA_MaskedDecode."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..asuka_core.decoder import (
    REGION_AUTO, REGION_FULL, REGION_MODES, crop_like_vae_encode, decode_memory_estimate, latent_family_warning,
    load_decoder,
)
from ..asuka_core.errors import AsukaError, InputError
from ..asuka_core.imaging import composite as paste_fill, prepare_image_and_mask
from ..asuka_core.tiling import MIN_TILE
from . import common, previews
from .types import CATEGORY, DECODER

# Latent cells per tile when an untiled decode runs out of memory, largest first. The last
# is the smallest tile docs/decoder.md recommends (64 cells = 512 px); smaller tiles change
# the result more, so the fallback never goes below it on its own: the user is told to
# choose a smaller tile_size instead.
OOM_TILE_SIZES = (128, 96, 64)
OOM_TILE_OVERLAP = 8  # latent cells (64 px), the node's default overlap


class DecoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_DecoderLoader",
            display_name="Load ASUKA Masked Decoder",
            category=CATEGORY,
            description=(
                "Loads the decoder that turns the sampled result into pixels without colour seams at the "
                "edge of the hole. "
                "The file comes from models/asuka: an Asymmetric VQGAN decoder for SD1.5 "
                "latents (diffusers AsymmetricAutoencoderKL x1.5 / x2, or the original checkpoints) "
                "or the ASUKA decoder for FLUX latents (asuka_decoder.ckpt). The kind and size are "
                "read from the weights."
            ),
            inputs=[
                io.Combo.Input("decoder_name", options=common.model_files(),
                               tooltip="Decoder weights in models/asuka (.safetensors, .ckpt, .bin)."),
            ],
            outputs=[DECODER.Output(display_name="decoder", tooltip="The masked decoder.")],
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, decoder_name: str) -> bool:
        return True  # a missing file is reported when the node runs, with every missing file of the graph

    @classmethod
    def execute(cls, decoder_name: str) -> io.NodeOutput:
        return io.NodeOutput(common.load_patched_model(decoder_name, load_decoder, role="decoder", node_cls=cls))


class MaskedDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_MaskedDecode",
            display_name="ASUKA Masked Decode",
            category=CATEGORY,
            description=(
                "Turns the sampled result into the picture, with the fill's colours matching the rest and "
                "no seam at the edge of the hole. "
                "It decodes the latent while looking at the known pixels and the mask. Use it in place of VAE Decode "
                "after an inpainting KSampler."
            ),
            inputs=[
                DECODER.Input("decoder", tooltip="From Load ASUKA Masked Decoder."),
                io.Latent.Input("samples", tooltip="The sampled latent (e.g. KSampler output)."),
                io.Image.Input("image", tooltip=(
                    "The original picture the latent was made from, same size as the latent x8 (a picture "
                    "that VAE Encode cropped to multiples of 8 is cropped the same way here).")),
                io.Mask.Input("mask", tooltip="1 = the filled area; the same mask given to the sampler."),
                io.Boolean.Input("composite", default=True, tooltip=(
                    "On: pixels outside the mask are copied unchanged from the input image and the mask "
                    "blends the decoded fill in. Off: the decoder's raw output everywhere.")),
                io.Int.Input("tile_size", default=0, min=0, max=4096, step=8, tooltip=(
                    "0 = decode the whole image at once; if memory runs out it is decoded in 1024, 768 or "
                    "512 px tiles and the node says so. "
                    "Otherwise the tile side in pixels (512 or more recommended: tiles only approximate "
                    "the whole-image decode, see docs/decoder.md), to bound memory on very large images.")),
                io.Int.Input("tile_overlap", default=64, min=0, max=1024, step=8, tooltip=(
                    "Overlap between tiles in pixels; tiles are feathered across it so no seam shows.")),
                io.Combo.Input("region", options=list(REGION_MODES), default=REGION_FULL, optional=True, tooltip=(
                    "Which part is decoded. full (default): the whole picture, exactly as before. auto: with "
                    "composite on, only the hole plus the margin the decoder's upper layers can see "
                    "(120-150 px) when that is at most half the picture, otherwise all of it: much faster "
                    "for a small hole in a large picture. hole: always only the hole and its margin "
                    "(outside it the output is the input image, even with composite off). In auto and hole "
                    "the upper layers' normalisation sees only the region, so the hole is not identical "
                    "with a full decode; how far it differs with real weights has not been measured (with "
                    "random test weights it differs a lot). See docs/decoder.md.")),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The decoded picture.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, decoder, samples, image, mask, composite: bool, tile_size: int,
                tile_overlap: int, region: str = REGION_FULL) -> io.NodeOutput:
        if 0 < tile_size < MIN_TILE * 8:
            raise InputError(f"tile_size {tile_size} px is too small: use 0 (no tiling) or at least "
                             f"{MIN_TILE * 8} px.")
        latent = samples["samples"]
        warning = latent_family_warning(decoder.model, latent) if isinstance(latent, torch.Tensor) else None
        if warning:
            common.log.warning("ASUKA Masked Decode: %s", warning)
            common.notify(cls, warning)
        model = common.activate(
            decoder, decode_memory_estimate(decoder.model, latent.shape, decoder.model.compute_dtype))
        tile = tile_size // 8 or None
        overlap = tile_overlap // 8
        if region == REGION_AUTO and not composite:
            region = REGION_FULL  # the raw output is wanted everywhere
        try:
            pixels = model.decode(latent, image, mask, tile_size=tile, tile_overlap=overlap, region=region,
                                  progress=common.progress_bar(1))
        except Exception as e:  # noqa: BLE001 - only memory errors are handled, see below
            if tile is not None or not common.is_out_of_memory(e):
                raise
            mm.soft_empty_cache()
            pixels = cls._decode_tiled_fallback(model, latent, image, mask, max(overlap, OOM_TILE_OVERLAP), region)
        if composite:
            image, mask = prepare_image_and_mask(image, mask, require_hole=False)
            image, mask = crop_like_vae_encode(image, mask, model.config.scale)  # as decode() did
            pixels = paste_fill(image.to(pixels.device), pixels, mask.to(pixels.device))
        pixels = pixels.to(common.intermediate_device())
        return io.NodeOutput(pixels, ui=previews.decode_preview(pixels, mask))

    @classmethod
    def _decode_tiled_fallback(cls, model, latent, image, mask, overlap, region=REGION_FULL):
        """Retry an untiled decode that ran out of memory in tiles of OOM_TILE_SIZES (only
        sizes smaller than the latent: a tile as large as the image is the same decode), and
        tell the user which size was used."""
        height, width = latent.shape[-2:]
        sizes = [t for t in OOM_TILE_SIZES if t < max(height, width)]
        for tile in sizes:
            try:
                pixels = model.decode(latent, image, mask, tile_size=tile, tile_overlap=min(overlap, tile // 4),
                                      region=region, progress=common.progress_bar(1))
            except Exception as e:  # noqa: BLE001
                if not common.is_out_of_memory(e):
                    raise
                mm.soft_empty_cache()
                continue
            message = (f"Not enough memory to decode {width * 8}x{height * 8} at once: decoded in "
                       f"{tile * 8} px tiles instead (tiles approximate the whole-image decode, see "
                       "docs/decoder.md).")
            common.log.warning("ASUKA Masked Decode: %s", message)
            common.notify(cls, message)
            return pixels
        smallest = f" or in {sizes[-1] * 8} px tiles" if sizes else ""
        raise AsukaError(
            f"ASUKA Masked Decode ran out of memory decoding {width * 8}x{height * 8} at once{smallest}. "
            "Free memory (close other programs, start ComfyUI with --lowvram), or set tile_size to a "
            f"smaller value yourself (tiles under {OOM_TILE_SIZES[-1] * 8} px change the result more)."
        )

NODES = [DecoderLoader, MaskedDecode]
