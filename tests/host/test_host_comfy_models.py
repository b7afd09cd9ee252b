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


# --------------------------------------------------------------------------------------
# Half precision: the dtype ComfyUI would choose, and the numerics of real manual_cast


@pytest.mark.parametrize("bf16, fp16, fp16_vae, encoder, decoder", [
    (True, True, False, torch.bfloat16, torch.bfloat16),    # Ampere and newer
    (False, True, False, torch.float16, torch.float32),     # GTX 10xx / RTX 20xx: no bf16
    (False, False, False, torch.float32, torch.float32),    # e.g. GTX 16xx, where fp16 is broken
    (False, True, True, torch.float16, torch.float16),      # --fp16-vae
])
def test_dtype_policy_follows_comfyui(comfy, monkeypatch, bf16, fp16, fp16_vae, encoder, decoder):
    mm = comfy.mm
    monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: bf16)
    monkeypatch.setattr(mm, "should_use_fp16", lambda *a, **k: fp16)
    monkeypatch.setattr(mm.args, "fp16_vae", fp16_vae)
    device = torch.device("cuda", 0)  # only passed to the (replaced) capability checks
    assert comfy.common.compute_dtype(device, comfy.common.ROLE_ENCODER) == encoder
    assert comfy.common.compute_dtype(device, comfy.common.ROLE_DECODER) == decoder


def test_load_patched_model_applies_the_policy(comfy, monkeypatch, tmp_path):
    """Every model loaded through load_patched_model gets the dtype (FLUX aligners too)."""
    import folder_paths
    from tests.fixtures.aligner_files import write_official_aligner_pt

    write_official_aligner_pt(tmp_path / "asuka_alignment_clip.pt", width=768, depth=1)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, comfy.common.MODEL_FOLDER,
                        ([str(tmp_path)], {".pt"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(comfy.common, "compute_dtype", lambda device, role="encoder": torch.float16)
    patcher = comfy.common.load_patched_model("asuka_alignment_clip.pt",
                                              comfy.pack("asuka_core.aligner").load_aligner, role="encoder")
    assert patcher.model.compute_dtype == torch.float16
    assert {p.dtype for p in patcher.model.parameters()} == {torch.float16}
    assert patcher.model.compute_device == patcher.load_device


UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _public_output(model, kind: str, seed: int = 0) -> torch.Tensor:
    """The value each node passes on: MAE features, aligner conditioning, decoded pixels."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mae":
        image = torch.rand(2, 96, 128, 3, generator=g)
        mask = torch.zeros(2, 96, 128)
        mask[:, 20:70, 30:90] = 1.0
        return model.encode(image, mask).features
    if kind == "aligner":
        return model.conditioning(torch.randn(2, 256, 512, generator=g), 1.0)[0]
    channels = 16 if kind == "asuka_decoder" else 4
    z = torch.randn(1, channels, 8, 8, generator=g)
    image = torch.rand(1, 64, 64, 3, generator=g)
    mask = torch.zeros(1, 64, 64)
    mask[:, 10:40, 20:50] = 1.0
    return model.decode(z, image, mask)


def _rounding_layers(model) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "weight") and getattr(m, "weight") is not None
               and m.weight.ndim >= 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_through_manual_cast_is_close_to_float32(comfy, kind, dtype):
    """Weights stored and computed in ``dtype`` through ComfyUI's real manual_cast layers.

    Bound, from rounding alone (not measured on this code): every weight layer rounds its
    weights and its output with relative error <= u (the unit roundoff: 2^-8 bf16, 2^-11
    fp16); independent errors over L layers add up like a random walk, ~u*sqrt(2L). The
    test allows 4x that as a relative RMS error."""
    reference = _build(comfy, kind)
    half = _build(comfy, kind, dtype)
    half.compute_dtype = dtype
    assert {p.dtype for p in half.parameters()} == {dtype}
    with torch.no_grad():
        expected, got = _public_output(reference, kind), _public_output(half, kind)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = ((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()
    bound = 4 * UNIT_ROUNDOFF[dtype] * (2 * _rounding_layers(reference)) ** 0.5
    print(f"{kind} {dtype}: relative RMS error {rel:.2e} (bound {bound:.2e})")
    assert rel < bound


def _large_activations(kind: str, sd: dict) -> dict:
    """Weights whose activations pass float16's maximum (65504) in fp32, while each layer's
    own output stays inside it: every block adds the same +-20000 pattern to the residual
    stream (MAE, aligner); the decoder's first conv is simply scaled up."""
    sd = dict(sd)
    g = torch.Generator().manual_seed(7)

    def pattern(t):
        return 2e4 * (torch.randint(0, 2, t.shape, generator=g) * 2 - 1).to(t.dtype)

    if kind == "mae":
        p = pattern(sd["decoder_blocks.0.mlp.fc2.bias"])
        for b in range(MAE_TINY["decoder_depth"]):
            sd[f"decoder_blocks.{b}.mlp.fc2.bias"] = p
    elif kind == "aligner":
        p = pattern(sd["1.linear2.bias"])
        for b in (1, 2, 3, 4):
            sd[f"{b}.linear2.bias"] = p
    else:
        sd["decoder.conv_in.weight"] = sd["decoder.conv_in.weight"] * 3e4
    return {k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_float16_overflow_stays_finite(comfy, kind):
    """Where fp16 cannot hold a value, the result must still be the float32 one (residual
    streams kept in float32; a decode that overflows is redone in float32), never inf/NaN."""
    if kind == "mae":
        sd, load = official_mae_state_dict(0, **MAE_TINY), comfy.pack("asuka_core.mae").load_mae
    elif kind == "aligner":
        sd, load = official_aligner_state_dict(0, width=768, depth=4), comfy.pack("asuka_core.aligner").load_aligner
    elif kind == "asuka_decoder":
        sd, load = asuka_decoder_state_dict(seed=5, z_channels=16, **DECODER_TINY), comfy.pack("asuka_core.decoder").load_decoder
    else:
        sd, load = avq_ldm_state_dict(seed=5, with_extras=False, **DECODER_TINY), comfy.pack("asuka_core.decoder").load_decoder
    sd = _large_activations(kind, sd)
    reference = load(sd, operations=comfy.ops.manual_cast, dtype=torch.float32)
    half = load(sd, operations=comfy.ops.manual_cast, dtype=torch.float16)
    half.compute_dtype = torch.float16
    with torch.no_grad():
        expected, got = _public_output(reference, kind), _public_output(half, kind)
    assert torch.isfinite(expected).all()
    assert torch.isfinite(got).all(), "float16 overflowed into inf/NaN"
    rel = ((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()
    assert rel < 4 * UNIT_ROUNDOFF[torch.float16] * (2 * _rounding_layers(reference)) ** 0.5


# --------------------------------------------------------------------------------------
# ASUKA Masked Decode: progress, Cancel and the out-of-memory fallback (the node's code)


def _decode_node(comfy, latent_cells: int, seed: int = 0):
    model = _build(comfy, "asuka_decoder")
    patcher = comfy.common.patch_model(model, torch.float32, load_device=CPU, offload_device=CPU)
    g = torch.Generator().manual_seed(seed)
    size = latent_cells * 8
    # spread like a sampled FLUX latent (raw ComfyUI LATENT values, std ~1/0.3611)
    latent = torch.randn(1, 16, latent_cells, latent_cells, generator=g) / 0.3611
    image = torch.rand(1, size, size, 3, generator=g)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4:size // 2, size // 3:size * 2 // 3] = 1.0
    node = comfy.pack("nodes.decoder").MaskedDecode
    return node, patcher, dict(decoder=patcher, samples={"samples": latent}, image=image, mask=mask,
                               composite=False, tile_size=0, tile_overlap=64)


def _inject_oom(model, too_large: int) -> list[int]:
    """Make the decoder's forward fail like CUDA does for inputs wider than ``too_large``
    latent cells, and otherwise return its image input (a stand-in that keeps the test fast
    and makes the tiled result known: the picture itself). Returns the latent sizes seen."""
    calls: list[int] = []

    def failing(z, image, mask, stage=None):
        calls.append(max(z.shape[-2:]))
        if max(z.shape[-2:]) > too_large:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return image

    model.forward = failing
    return calls


def test_untiled_decode_reports_progress_and_stops_on_cancel(comfy, monkeypatch):
    import comfy.utils as comfy_utils

    node, patcher, kwargs = _decode_node(comfy, 8)
    updates = []
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", lambda value, total, *a, **k: updates.append((value, total)))
    # ComfyUI 0.33.0 drops updates less than 100 ms / 0.5 % apart: count every one here
    monkeypatch.setattr(comfy_utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0, raising=False)
    monkeypatch.setattr(comfy_utils, "PROGRESS_THROTTLE_MIN_PERCENT", 0.0, raising=False)
    node.execute(**kwargs)
    model = patcher.model
    assert len(updates) == model.stages and updates[-1][0] == updates[-1][1]   # one decode, several steps

    finished = []
    model.conv_out.register_forward_hook(lambda *a: finished.append(True))
    comfy.mm.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.mm.InterruptProcessingException):
            node.execute(**kwargs)
    finally:
        comfy.mm.interrupt_current_processing(False)
    assert not finished, "Cancel did not stop the untiled decode before its end"


def test_out_of_memory_falls_back_to_documented_tiles_and_says_so(comfy, monkeypatch):
    node, patcher, kwargs = _decode_node(comfy, 72)     # 576 px: larger than one 512 px tile
    messages = []
    monkeypatch.setattr(comfy.common, "notify", lambda cls, text: messages.append(text))
    calls = _inject_oom(patcher.model, too_large=64)
    out = node.execute(**kwargs).result[0]
    assert calls == [72] + [64] * 4                    # whole image first, then 2x2 tiles of 512 px
    assert torch.allclose(out, kwargs["image"], atol=1e-5)   # tiles blended back into the whole picture
    assert len(messages) == 1 and "512 px tiles" in messages[0]


def test_out_of_memory_never_drops_below_the_documented_tile(comfy, monkeypatch):
    node, patcher, kwargs = _decode_node(comfy, 136)    # 1088 px: 128, 96 and 64-cell tiles fit inside
    monkeypatch.setattr(comfy.common, "notify", lambda cls, text: pytest.fail("claimed success"))
    calls = _inject_oom(patcher.model, too_large=0)     # nothing fits
    with pytest.raises(comfy.pack("asuka_core.errors").AsukaError, match=r"out of memory.*tile_size"):
        node.execute(**kwargs)
    assert calls == [136, 128, 96, 64]                  # one try per size, largest first, none under 512 px


# --------------------------------------------------------------------------------------
# Latent families and sizes


def test_image_not_multiple_of_8_is_cropped_as_vae_encode_does(comfy):
    """ComfyUI's VAEEncode crops a 45x35 picture to 40x32 before encoding; the decoder
    (and the node's composite) must use the same pixels, not refuse the picture."""
    from comfy.sd import VAE

    node, patcher, kwargs = _decode_node(comfy, 4)
    g = torch.Generator().manual_seed(5)
    image, mask = torch.rand(1, 35, 45, 3, generator=g), torch.zeros(1, 35, 45)
    mask[:, 5:20, 10:30] = 1.0
    latent = torch.randn(1, 16, 35 // 8, 45 // 8, generator=g) / 0.3611
    # ComfyUI's own crop rule (VAE.vae_encode_crop_pixels) as the oracle
    fake_vae = type("V", (), {"crop_input": True, "spacial_compression_encode": lambda self: 8,
                              "output_channels": 3, "pad_channel_value": None})()   # read by ComfyUI >= 0.8
    cropped = VAE.vae_encode_crop_pixels(fake_vae, image)
    cropped_mask = VAE.vae_encode_crop_pixels(fake_vae, mask[..., None])[..., 0]
    assert cropped.shape == (1, 32, 40, 3)
    model = patcher.model
    assert torch.equal(model.decode(latent, image, mask), model.decode(latent, cropped, cropped_mask))
    kwargs.update(samples={"samples": latent}, image=image, mask=mask, composite=True)
    out = node.execute(**kwargs).result[0]
    assert out.shape == (1, 32, 40, 3)
    keep = cropped_mask[0] == 0
    assert torch.equal(out[0][keep], cropped[0][keep])       # the composite pasted the same pixels


def test_sd3_latent_on_the_flux_decoder_is_flagged(comfy, monkeypatch):
    """Both have 16 channels; ComfyUI's own latent formats say how each is stored."""
    import comfy.latent_formats as formats

    decoder = comfy.pack("asuka_core.decoder")
    node, patcher, kwargs = _decode_node(comfy, 8)
    sampled = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))  # a sampler's units
    sd3, flux = formats.SD3().process_out(sampled), formats.Flux().process_out(sampled)
    assert decoder.latent_family_warning(patcher.model, flux) is None
    assert decoder.latent_family_warning(patcher.model, torch.zeros_like(flux)) is None
    assert "SD3" in decoder.latent_family_warning(patcher.model, sd3)
    messages = []
    monkeypatch.setattr(comfy.common, "notify", lambda cls, text: messages.append(text))
    node.execute(**{**kwargs, "samples": {"samples": sd3}})
    assert len(messages) == 1 and "VAE Decode" in messages[0]
