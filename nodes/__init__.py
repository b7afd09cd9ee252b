"""ComfyUI nodes of the pack: thin glue over ``asuka_core`` (one module per model)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import aligner, decoder, decoder_training, flux, hd_painter, mae, super_resolution, training

NODES: list[type[io.ComfyNode]] = [
    *mae.NODES, *aligner.NODES, *decoder.NODES, *flux.NODES, *hd_painter.NODES, *super_resolution.NODES,
    *training.NODES, *decoder_training.NODES,
]


class AsukaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
