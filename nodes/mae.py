"""Nodes for the MAE prior encoder: ASUKA_MAELoader, ASUKA_MAEPrior."""

from __future__ import annotations

from comfy_api.latest import io

from ..asuka_core.mae import load_mae
from . import common, previews
from .types import CATEGORY, MAE, PRIOR


class MAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_MAELoader",
            display_name="Load ASUKA MAE Prior",
            category=CATEGORY,
            description=(
                "Loads the model that guesses what belongs in the hole from the rest of the picture (the "
                "MAE prior). "
                "The file comes from models/asuka, e.g. the official "
                "mae_300.pth from the ASUKA-FLUX.1-Fill release, loaded as released without running "
                "code from the file. The architecture (ViT-B or ViT-L) is read from the weights."
            ),
            inputs=[
                io.Combo.Input("mae_name", options=common.model_files(),
                               tooltip="MAE weights in models/asuka (.pth, .pt, .ckpt or .safetensors)."),
            ],
            outputs=[MAE.Output(display_name="mae", tooltip="The MAE prior encoder.")],
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, mae_name: str) -> bool:
        return True  # a missing file is reported when the node runs, with every missing file of the graph

    @classmethod
    def execute(cls, mae_name: str) -> io.NodeOutput:
        return io.NodeOutput(common.load_patched_model(mae_name, load_mae, role="encoder", node_cls=cls))


class MAEPrior(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ASUKA_MAEPrior",
            display_name="ASUKA MAE Prior",
            category=CATEGORY,
            description=(
                "Looks at the picture around the hole and works out what should go in it, so the fill does "
                "not invent unrelated objects. "
                "Encodes what the MAE infers about the masked area from the unmasked pixels only. "
                "The image is resized to 256x256 (squashed, as the official code does, whatever its "
                "aspect ratio); 16x16 patches that touch the hole are hidden from the encoder, so "
                "what is in the hole does not shape the prior. Feed the prior to ASUKA Aligner "
                "Conditioning."
            ),
            inputs=[
                MAE.Input("mae", tooltip="From Load ASUKA MAE Prior."),
                io.Image.Input("image", tooltip="The picture to inpaint (a batch is fine)."),
                io.Mask.Input("mask", tooltip=(
                    "1 = area to fill. One mask for the whole batch or one per image; a mask of another "
                    "size is resized to the image. Must not be empty.")),
            ],
            outputs=[
                PRIOR.Output(display_name="prior", tooltip="MAE features [B,256,512] for the aligner."),
                io.Image.Output(display_name="reconstruction", tooltip=(
                    "The MAE's own low-resolution estimate of the whole picture (nothing pasted); "
                    "a preview of what the prior 'sees'.")),
            ],
        )

    @classmethod
    def execute(cls, mae, image, mask) -> io.NodeOutput:
        model = common.activate(mae)
        prior = model.encode(image, mask, progress=common.progress_bar(image.shape[0]))
        prior = prior.to(common.intermediate_device())
        return io.NodeOutput(prior, prior.reconstruction, ui=previews.prior_preview(image, mask, prior))


NODES = [MAELoader, MAEPrior]
