"""comfyui-asuka: ASUKA inpainting nodes for ComfyUI (V3 node API).

ComfyUI calls ``comfy_entrypoint``, which registers the ``models/asuka`` folder and the
nodes. Deliberately no ``NODE_CLASS_MAPPINGS``: ComfyUI would then ignore the entrypoint.
Nothing is imported at module level, so the repository root stays importable outside
ComfyUI (pytest imports it as a package).
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .compat import load_error, warn_if_changed

    warn_if_changed()   # one warning naming what changed, if this ComfyUI differs from the tested ones
    try:
        from .nodes import AsukaExtension
        from .nodes.common import install_example_images, quiet_user_errors, register_model_folder
    except (ImportError, AttributeError) as e:
        raise ImportError(load_error(e)) from e

    register_model_folder()
    quiet_user_errors()
    install_example_images()
    return AsukaExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
