"""Nodes for HD-Painter's inpainting-specialised x4 super-resolution:
ASUKA_HDPainterSRSampler (known-latent blending sampler for the SD x4 upscaler) and
ASUKA_PoissonBlend (the final gradient-domain blend into the original).

Thin glue: the maths is in ``asuka_core.super_resolution`` and ``asuka_core.poisson``.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..asuka_core.poisson import blend_images
from . import common
from .types import CATEGORY

SR_CATEGORY = CATEGORY + "/hd-painter"


class PoissonBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_PoissonBlend",
            display_name="Poisson Blend (HD-Painter)",
            category=SR_CATEGORY,
            description=(
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


NODES = [PoissonBlend]
