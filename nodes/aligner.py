"""Nodes for the aligner: ASUKA_AlignerLoader, ASUKA_AlignerConditioning."""

from __future__ import annotations

from comfy_api.latest import io

from ..asuka_core.aligner import TARGET_FLUX_CLIP, TARGET_SD15, load_aligner
from ..asuka_core.errors import CheckpointError
from . import common
from .types import ALIGNER, CATEGORY, PRIOR


class AlignerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_AlignerLoader",
            display_name="Load ASUKA Aligner",
            category=CATEGORY,
            description=(
                "Loads the aligner, which turns the MAE's guess about the hole into something the image "
                "model understands. "
                "The file comes from models/asuka. SD1.5 graphs need an SD1.5 aligner "
                "(safetensors marked 'sd15'); none is published yet, so it has to be trained. The "
                "released FLUX aligners (asuka_alignment_clip.pt / _t5.pt) load but are refused by "
                "the SD1.5 conditioning node."
            ),
            inputs=[
                io.Combo.Input("aligner_name", options=common.model_files(),
                               tooltip="Aligner weights in models/asuka (.safetensors, .pt)."),
            ],
            outputs=[ALIGNER.Output(display_name="aligner", tooltip="The aligner.")],
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, aligner_name: str) -> bool:
        return True  # a missing file is reported when the node runs, with every missing file of the graph

    @classmethod
    def execute(cls, aligner_name: str) -> io.NodeOutput:
        return io.NodeOutput(common.load_patched_model(aligner_name, load_aligner, role="encoder", node_cls=cls))


class AlignerConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_AlignerConditioning",
            display_name="ASUKA Aligner Conditioning (SD1.5)",
            category=CATEGORY,
            description=(
                "Uses the MAE's guess about the hole instead of a text prompt, for SD1.5 inpainting. "
                "Turns the MAE prior into SD1.5 conditioning that replaces the text prompt: 256 "
                "tokens of width 768 for the UNet's cross-attention. Connect positive and negative "
                "to InpaintModelConditioning, then KSampler. Use cfg 1.0 (ASUKA is run without "
                "classifier-free guidance); the negative only matters when cfg > 1."
            ),
            inputs=[
                ALIGNER.Input("aligner", tooltip="From Load ASUKA Aligner (an SD1.5 aligner)."),
                PRIOR.Input("prior", tooltip="From ASUKA MAE Prior."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05, tooltip=(
                    "1.0 = the aligner's conditioning as trained. Lower values move it toward the "
                    "'no visible context' conditioning (the negative); 0 gives the negative itself.")),
                io.Boolean.Input("experimental_flux_clip", default=False, optional=True, tooltip=(
                    "Experimental, untested: also accept the released FLUX CLIP-branch aligner "
                    "(asuka_alignment_clip.pt). It has the SD1.5 aligner's layout and was trained "
                    "towards CLIP-L's space, but only through the mean of its tokens, so its tokens "
                    "may mean nothing to SD1.5. Nobody has checked the results; off by default.")),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="ASUKA conditioning."),
                io.Conditioning.Output(display_name="negative", tooltip=(
                    "The aligner's output for an empty prior (no visible context). Unused by the "
                    "sampler at cfg 1.0.")),
            ],
        )

    @classmethod
    def execute(cls, aligner, prior, strength: float, experimental_flux_clip: bool = False) -> io.NodeOutput:
        targets = (TARGET_SD15, TARGET_FLUX_CLIP) if experimental_flux_clip else (TARGET_SD15,)
        try:
            aligner.model.expect_target(*targets, where="ASUKA Aligner Conditioning (SD1.5)")
        except CheckpointError as e:
            if aligner.model.target != TARGET_FLUX_CLIP:
                raise
            raise CheckpointError(f"{e} To try it anyway (untested), switch on experimental_flux_clip.") from None
        model = common.activate(aligner)
        positive, negative = model.conditioning(prior.features, strength)
        device = common.intermediate_device()
        return io.NodeOutput([[positive.to(device), {}]], [[negative.to(device), {}]])


NODES = [AlignerLoader, AlignerConditioning]
