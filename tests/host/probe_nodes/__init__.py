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


# ---------------------------------------------------------------------------------- FLUX
# ``ASUKATest_RecordModelInputs`` is the FLUX analogue of the cross-attention recorder:
# FLUX has no attn2 patches, so it wraps the model call (``model_function_wrapper``) and
# records, per call, what the diffusion model is given: the token sequence
# (``c_crossattn``), the pooled vector (``y``), the guidance value and the Fill concat.
# ``ASUKATest_FluxEmpty`` stands in for ``CLIPTextEncode("")`` with the FLUX text encoders
# (the real one needs the 4.8 B-parameter T5-XXL): seeded random tensors of the same
# shapes, from ``tests/fixtures/flux_files.stand_in_empty``.


def _flux_fixtures():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "fixtures", "flux_files.py")
    spec = importlib.util.spec_from_file_location("asuka_test_flux_files", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shape(t):
    return list(t.shape) if t is not None and hasattr(t, "shape") else None


class RecordModelInputs(RecordCrossAttention):  # same inputs and outputs, another hook
    DESCRIPTION = ("Test probe: records what the diffusion model receives on every call (token sequence, "
                   "pooled vector, guidance, concat) as JSON lines appended to 'path'.")

    def patch(self, model, path):
        if not path:
            raise ValueError("ASUKATest_RecordModelInputs needs a file path")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        patched = model.clone()

        def wrapper(apply_model, args):
            c = args["c"]
            ctx, y, guidance = c.get("c_crossattn"), c.get("y"), c.get("guidance")
            entry = {
                "keys": sorted(k for k in c if k != "transformer_options"),
                "input": _shape(args["input"]),
                "context": _shape(ctx),
                "y": _shape(y),
                "c_concat": _shape(c.get("c_concat")),
                "guidance": guidance.double().flatten().tolist() if guidance is not None else None,
                "cond_or_uncond": list(args.get("cond_or_uncond", [])),
                "finite": bool(ctx.isfinite().all()) if ctx is not None else None,
            }
            if ctx is not None:
                d = ctx.double()
                entry["context_sum"] = d.sum(dim=(1, 2)).tolist()          # per sample
                entry["context_abs_sum"] = d.abs().sum(dim=(1, 2)).tolist()
                entry["context_head"] = d[:, :3, :6].tolist()              # first tokens, first channels
                entry["context_tail"] = d[:, -1, -6:].tolist()             # last token, last channels
            if y is not None:
                entry["y_values"] = y.double().tolist()
            with _lock, open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            return apply_model(args["input"], args["timestep"], **c)

        patched.set_model_unet_function_wrapper(wrapper)
        return (patched,)


class FluxEmpty:
    DESCRIPTION = ("Test probe: a seeded stand-in for CLIPTextEncode('') with FLUX's text encoders "
                   "(T5 tokens [1,256,4096] + pooled_output [1,768]).")
    CATEGORY = "_for_testing/asuka"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                              "tooltip": "Seed of the random tensors."})}}

    def make(self, seed):
        txt, pooled = _flux_fixtures().stand_in_empty(seed)
        return ([[txt, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS.update({"ASUKATest_RecordModelInputs": RecordModelInputs, "ASUKATest_FluxEmpty": FluxEmpty})
NODE_DISPLAY_NAME_MAPPINGS.update({"ASUKATest_RecordModelInputs": "ASUKA test: record model inputs",
                                   "ASUKATest_FluxEmpty": "ASUKA test: stand-in FLUX empty prompt"})
