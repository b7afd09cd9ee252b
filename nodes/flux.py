"""Node for ASUKA on FLUX.1-Fill: ASUKA_FluxConditioning (maths in asuka_core.flux)."""

from __future__ import annotations

from comfy_api.latest import io

from ..asuka_core import flux
from ..asuka_core.errors import InputError
from . import common
from .types import ALIGNER, CATEGORY, PRIOR


def _empty_tensors(empty):
    """(T5 tokens, pooled) of a one-entry FLUX CONDITIONING, or (None, None)."""
    if empty is None:
        return None, None
    if not isinstance(empty, list) or len(empty) != 1:
        count = len(empty) if isinstance(empty, list) else type(empty).__name__
        raise InputError(
            f"'empty' should be one CLIP Text Encode output (one conditioning entry), got {count} entries. "
            "Connect CLIP Text Encode with no text directly, not a combination of conditionings.")
    tensor, extra = empty[0][0], empty[0][1]
    return tensor, extra.get("pooled_output")


class FluxConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_FluxConditioning",
            display_name="ASUKA FLUX Conditioning",
            category=CATEGORY,
            description=(
                "Uses the MAE's guess about the hole instead of a text prompt, for FLUX.1-Fill inpainting "
                "with the released ASUKA weights. "
                "ASUKA for FLUX.1-Fill-dev with the released weights: turns the MAE prior into the "
                "conditioning FLUX reads instead of a prompt (256 tokens x 4096 from the T5-branch "
                "aligner, and the mean of the CLIP-branch aligner's tokens as the pooled vector), blended "
                "toward the empty prompt as the official pipeline does. Connect it to "
                "InpaintModelConditioning (noise_mask off), then KSampler with cfg 1.0."
            ),
            inputs=[
                PRIOR.Input("prior", tooltip="From ASUKA MAE Prior (the official mae_300.pth)."),
                ALIGNER.Input("clip_aligner", tooltip=(
                    "The pooled-vector branch: Load ASUKA Aligner with asuka_alignment_clip.pt (width 768).")),
                ALIGNER.Input("t5_aligner", tooltip=(
                    "The token branch: Load ASUKA Aligner with asuka_alignment_t5.pt (width 4096, 1.0 B "
                    "parameters, about 1.6 GB in bf16).")),
                io.Float.Input("weight", default=flux.DEFAULT_WEIGHT, min=0.0, max=2.0, step=0.05, tooltip=(
                    "How much of the ASUKA prior, against the empty prompt: empty + weight x (ASUKA - empty). "
                    "0.5 is the official setting (its 'CFG 0.5'); 1.0 is the pure prior, as in the paper, "
                    "and is the only value allowed without 'empty'.")),
                io.Float.Input("guidance", default=flux.DEFAULT_GUIDANCE, min=0.0, max=100.0, step=0.5,
                               tooltip="FLUX's distilled guidance; 30 is the official value for FLUX.1-Fill."),
                io.Conditioning.Input("empty", optional=True, tooltip=(
                    "The empty prompt: CLIP Text Encode with no text, from DualCLIPLoader (clip_l + t5xxl, "
                    "type flux). Needed for any weight other than 1.0; nothing is blended without it.")),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip=(
                "FLUX conditioning: [B,256,4096] tokens with pooled_output [B,768] and guidance, one entry "
                "for the whole batch. Use it as positive (and, at cfg 1.0, also as negative: it is not "
                "evaluated)."))],
        )

    @classmethod
    def execute(cls, prior, clip_aligner, t5_aligner, weight: float, guidance: float,
                empty=None) -> io.NodeOutput:
        empty_txt, empty_pooled = _empty_tensors(empty)
        batch = prior.features.shape[0]

        def activate(patcher):
            return common.activate(patcher, flux.activation_bytes(patcher.model, batch))

        cond = flux.flux_conditioning(prior.features, clip_aligner, t5_aligner, weight=weight, guidance=guidance,
                                      empty_txt=empty_txt, empty_pooled=empty_pooled, activate=activate)
        device = common.intermediate_device()
        cond.txt, cond.pooled = cond.txt.to(device), cond.pooled.to(device)
        return io.NodeOutput(cond.comfy())


NODES = [FluxConditioning]
