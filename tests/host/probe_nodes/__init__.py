"""Test-only ComfyUI nodes, loaded by the host tests' server (never shipped with the pack).

``ASUKATest_RecordCrossAttention`` clones a MODEL and adds an attn2 patch that appends, for
every cross-attention call in the UNet, the shape of the context (the keys/values the
UNet attends to) as one JSON line to a file. The pipeline tests read that file to prove
the sampler saw the aligner's 256 tokens of width 768, never CLIP's 77.

The conftest links this folder into a temporary ``custom_nodes`` directory named in the
server's ``extra_model_paths.yaml``; nothing is installed into the shared ComfyUI tree.
"""

from __future__ import annotations

import json
import os
import threading

_lock = threading.Lock()


class RecordCrossAttention:
    DESCRIPTION = ("Test probe: records the shape of every UNet cross-attention context "
                   "(JSON lines appended to 'path').")
    CATEGORY = "_for_testing/asuka"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to observe."}),
            "path": ("STRING", {"default": "", "tooltip": "JSON-lines file the shapes are appended to."}),
        }}

    def patch(self, model, path):
        if not path:
            raise ValueError("ASUKATest_RecordCrossAttention needs a file path")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        patched = model.clone()

        # ModelPatcher attn2 patches receive (n, context, value, extra_options) in
        # comfy/ldm/modules/attention.py BasicTransformerBlock and must return the triple.
        def record(n, context, value, extra_options):
            entry = {
                "context": list(context.shape),
                "value": list(value.shape) if value is not None else None,
                "query": list(n.shape),
                "block": list(extra_options.get("block", ()) or ()),
                "dtype": str(context.dtype),
                "finite": bool(context.isfinite().all()),
            }
            with _lock, open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            return n, context, value

        patched.set_model_attn2_patch(record)
        return (patched,)


NODE_CLASS_MAPPINGS = {"ASUKATest_RecordCrossAttention": RecordCrossAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"ASUKATest_RecordCrossAttention": "ASUKA test: record cross-attention"}
