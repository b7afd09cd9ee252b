"""The pack's models under ComfyUI's own model management and layer code, in process.

* Partial loading: ``ModelPatcher.load(..., lowvram_model_memory=...)`` is the path ComfyUI
  takes under ``--lowvram``/``--novram`` (and whenever a model does not fit): only some
  layers move to the compute device, the others get ``comfy_cast_weights`` and are cast
  per call, and tensors that live outside layers (the MAE's position tables, mask token,
  alpha) never move. The compute device must therefore be the patcher's ``load_device``.
  A CPU-only machine has no second device, so the load device here is ``meta``: any
  tensor left on the CPU then meets a ``meta`` tensor and the op fails, exactly as a
  CUDA/CPU mix fails on a GPU, and an output on the CPU shows a silent CPU run.
* Numerics under partial loading on the CPU: the same outputs as a full load, including a
  weight patch that ComfyUI applies through its lowvram patch functions.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.aligner_files import official_aligner_state_dict
from tests.fixtures.decoder_files import asuka_decoder_state_dict, avq_ldm_state_dict
from tests.fixtures.mae_files import official_mae_state_dict
from tests.host.inprocess import comfy_modules

MAE_TINY = dict(embed_dim=128, depth=2, decoder_dim=64, decoder_depth=7)
DECODER_TINY = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
META = torch.device("meta")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def comfy():
    return comfy_modules()


def _build(comfy, kind: str, dtype=torch.float32):
    """A model as load_patched_model builds it: the pack's loader with manual_cast layers."""
    if kind == "mae":
        sd = official_mae_state_dict(0, **MAE_TINY)
        return comfy.pack("asuka_core.mae").load_mae(sd, operations=comfy.ops.manual_cast, dtype=dtype)
    if kind == "aligner":
        sd = official_aligner_state_dict(0, width=768, depth=1)
        return comfy.pack("asuka_core.aligner").load_aligner(sd, operations=comfy.ops.manual_cast, dtype=dtype)
    if kind == "asuka_decoder":
        sd = asuka_decoder_state_dict(seed=5, z_channels=16, **DECODER_TINY)
    else:
        sd = avq_ldm_state_dict(seed=5, with_extras=False, **DECODER_TINY)
    return comfy.pack("asuka_core.decoder").load_decoder(sd, operations=comfy.ops.manual_cast, dtype=dtype)


def _inputs(kind: str, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mae":
        pixels = torch.randn(2, 3, 256, 256, generator=g)
        mask = torch.zeros(2, 1, 256, 256)
        mask[:, :, 40:150, 60:200] = 1.0
        mask[1, :, 150:153, 10:90] = 0.5       # partially covered patches use alpha
        return pixels.to(device), mask.to(device)
    if kind == "aligner":
        return (torch.randn(2, 256, 512, generator=g).to(device),)
    channels = 16 if kind == "asuka_decoder" else 4
    z = torch.randn(1, channels, 8, 8, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:40, 20:50] = 1.0
    return z.to(device), image.to(device), mask.to(device)


def _run(model, kind: str, inputs):
    with torch.no_grad():
        if kind == "mae":
            out = model.forward_prepared(*inputs)
            return out.features
        return model(*inputs)


def _partial_load(patcher, device, *, some_moved: bool = True) -> None:
    """ComfyUI's lowvram load with a budget that moves some layers and offloads others
    (its rule reserves room for offloaded weights, so the right fraction varies)."""
    model = patcher.model
    for fraction in (0.4, 0.6, 0.8, 0.9):
        patcher.load(device, lowvram_model_memory=int(patcher.model_size() * fraction))
        if model.model_lowvram and (model.model_loaded_weight_memory > 0 or not some_moved):
            return
        patcher.unpatch_model(CPU)
    pytest.fail("no budget gave a partial load: the test would not exercise partial loading")


KINDS = ["mae", "aligner", "asuka_decoder", "avq_decoder"]


@pytest.mark.parametrize("kind", KINDS)
def test_partial_load_computes_on_the_load_device(comfy, kind):
    model = _build(comfy, kind)
    _partial_load(comfy.common.patch_model(model, torch.float32, load_device=META, offload_device=CPU), META)
    moved = {p.device.type for p in model.parameters()}
    assert moved == {"cpu", "meta"}, f"expected a real partial load, parameters are on {moved}"
    # what decode()/encode() move their inputs to
    assert comfy.pack("asuka_core.runtime").compute_device_dtype(model) == (META, torch.float32)
    out = _run(model, kind, _inputs(kind, META))
    assert out.device == META          # computed where ComfyUI placed the model, not on the CPU


@pytest.mark.parametrize("kind", KINDS)
def test_partial_load_gives_the_full_load_result(comfy, kind):
    """On the CPU, with a weight patch on an offloaded layer (as a LoRA would add), a
    partially loaded model computes what the fully loaded, patched model computes."""
    reference = _build(comfy, kind)
    model = _build(comfy, kind)
    patcher = comfy.common.patch_model(model, torch.float32, load_device=CPU, offload_device=CPU)
    # a patch on every layer weight (as a LoRA adds): ComfyUI applies it to the layers it
    # moves and, per call, through its lowvram patch functions to the layers it offloads
    g = torch.Generator().manual_seed(1)
    diffs = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()
             if k.endswith(".weight") and v.ndim >= 2}
    assert sorted(patcher.add_patches({k: (d,) for k, d in diffs.items()})) == sorted(diffs)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for k, d in diffs.items():
            params[k].add_(d)
    _partial_load(patcher, CPU, some_moved=False)
    assert model.lowvram_patch_counter > 0   # the patch is applied per call, by ComfyUI's lowvram code
    inputs = _inputs(kind, CPU, seed=3)
    expected, got = _run(reference, kind, inputs), _run(model, kind, inputs)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    base = _run(_build(comfy, kind), kind, inputs)
    assert not torch.allclose(got, base, rtol=1e-4, atol=1e-5)       # the patch mattered
