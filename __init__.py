"""comfyui-asuka: ASUKA inpainting nodes for ComfyUI (V3 node API).

Registers the ``models/asuka`` folder and the nodes. Deliberately no
``NODE_CLASS_MAPPINGS``: ComfyUI would then ignore ``comfy_entrypoint``.
"""

from .nodes.common import register_model_folder

WEB_DIRECTORY = "./web"

register_model_folder()


async def comfy_entrypoint():
    from .nodes import AsukaExtension

    return AsukaExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
