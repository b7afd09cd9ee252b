"""asuka_core.aligner: official key sets, shape inference, the block maths against an
independent reference written here, the conditioning algebra, targets and files."""

from __future__ import annotations

import math
import types

import pytest
import torch
from safetensors import safe_open

from asuka_core.aligner import (
    TARGET_FLUX_CLIP,
    TARGET_FLUX_T5,
    TARGET_SD15,
    Aligner,
    aligner_config,
    load_aligner,
    save_aligner,
)
from asuka_core.errors import CheckpointError, InputError
from tests.fixtures.aligner_files import (
    PARAMS_768,
    PARAMS_768_NO_MODULATION,
    PARAMS_4096,
    PARAMS_4096_NO_MODULATION,
    official_aligner_state_dict,
    without_modulation,
    write_official_aligner_pt,
    write_sd15_aligner,
)
from tests.fixtures.mae_files import official_mae_state_dict


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors.values())


def _small(width=128, depth=2, seed=0, target=TARGET_SD15, dtype=torch.float32):
    """An aligner too narrow for any real target, built through the constructor."""
    sd = official_aligner_state_dict(seed, width, depth)
    model = Aligner(width, depth, target, dtype=dtype)
    model.load_state_dict(without_modulation(sd), strict=True)
    return model, sd


def _features(batch=2, seed=1):
    return torch.randn(batch, 256, 512, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# Official key sets and shapes


def test_official_key_set_and_parameter_totals():
    sd = official_aligner_state_dict(width=768, device="meta")
    assert len(sd) == 36
    assert sum(".modulation." in k for k in sd) == 8
    assert _numel(sd) == PARAMS_768 == 35_819_264
    assert _numel(without_modulation(sd)) == PARAMS_768_NO_MODULATION == 28_732_160
    t5 = official_aligner_state_dict(width=4096, device="meta")  # shapes only, nothing allocated
    assert len(t5) == 36
    assert _numel(t5) == PARAMS_4096
    assert _numel(without_modulation(t5)) == PARAMS_4096_NO_MODULATION


def test_official_state_dict_loads_strictly_and_infers_width_depth_heads():
    official_768 = official_aligner_state_dict(0, 768, 4)
    model = Aligner.from_state_dict(official_768)
    assert (model.width, model.depth, model.heads, model.target) == (768, 4, 12, TARGET_FLUX_CLIP)
    assert _numel(dict(model.named_parameters())) == PARAMS_768_NO_MODULATION
    own = model.state_dict()
    assert set(own) == set(without_modulation(official_768))
    for key, value in own.items():
        assert torch.equal(value, official_768[key]), key
    assert not any("modulation" in name for name, _ in model.named_modules())


def test_t5_width_inference_on_shapes_only():
    sd = official_aligner_state_dict(width=4096, device="meta")
    cfg = aligner_config(sd)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.target) == (4096, 4, 64, TARGET_FLUX_T5)
    model = Aligner.from_state_dict(sd, device="meta")  # the real module, no storage
    assert (model.width, model.depth, model.heads, model.target) == (4096, 4, 64, TARGET_FLUX_T5)
    assert _numel(dict(model.named_parameters())) == PARAMS_4096_NO_MODULATION
    assert model._modules["3"].linear1.weight.shape == (28672, 4096)
    assert model._modules["3"].linear2.weight.shape == (4096, 20480)


def test_depth_is_read_from_the_tensors():
    assert aligner_config(official_aligner_state_dict(width=768, depth=1, device="meta")).depth == 1
    assert aligner_config(official_aligner_state_dict(width=4096, depth=6, device="meta")).depth == 6
    model, _ = _small(depth=3)
    assert model.depth == 3 and "4" in model._modules and "5" not in model._modules


@pytest.mark.parametrize("breakage", ["missing_block", "bad_shape", "extra_key", "missing_final", "bad_input"])
def test_inconsistent_state_dicts_are_refused(breakage):
    sd = official_aligner_state_dict(width=768, device="meta")
    if breakage == "missing_block":
        sd = {k: v for k, v in sd.items() if not k.startswith("3.")}
    elif breakage == "bad_shape":
        sd["2.linear2.weight"] = torch.empty(768, 3072, device="meta")
    elif breakage == "extra_key":
        sd["2.attn.proj.weight"] = torch.empty(768, 768, device="meta")
    elif breakage == "missing_final":
        del sd["5.bias"]
    else:
        sd["0.weight"] = torch.empty(768, 768, device="meta")
    with pytest.raises(CheckpointError) as e:
        aligner_config(sd)
    assert "aligner" in str(e.value)


# --------------------------------------------------------------------------------------
# The maths, against an independent reference


def _reference_forward(sd, x, depth):
    """§3.1-3.2 written out with explicit operations, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    h = x.double() @ sd["0.weight"].T + sd["0.bias"]
    b_, n, d = h.shape
    heads = d // 64
    for b in range(1, depth + 1):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        u = (h - mu) / torch.sqrt(var + 1e-6)
        y = u @ sd[f"{b}.linear1.weight"].T + sd[f"{b}.linear1.bias"]
        q, k, v, m = y[..., :d], y[..., d:2 * d], y[..., 2 * d:3 * d], y[..., 3 * d:]
        q = q.reshape(b_, n, heads, 64)
        k = k.reshape(b_, n, heads, 64)
        v = v.reshape(b_, n, heads, 64)
        q = q / torch.sqrt((q ** 2).mean(-1, keepdim=True) + 1e-6) * sd[f"{b}.norm.query_norm.scale"]
        k = k / torch.sqrt((k ** 2).mean(-1, keepdim=True) + 1e-6) * sd[f"{b}.norm.key_norm.scale"]
        scores = torch.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(64)
        attn = torch.einsum("bhij,bjhc->bihc", scores.softmax(dim=-1), v).reshape(b_, n, d)
        gelu = 0.5 * m * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (m + 0.044715 * m ** 3)))
        h = h + torch.cat([attn, gelu], dim=-1) @ sd[f"{b}.linear2.weight"].T + sd[f"{b}.linear2.bias"]
    f = depth + 1
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + 1e-5) * sd[f"{f}.weight"] + sd[f"{f}.bias"]


def test_forward_matches_independent_reference():
    model, sd = _small(width=128, depth=2)
    x = _features(2)
    with torch.no_grad():
        out = model(x)
    ref = _reference_forward(sd, x, 2)
    assert out.shape == (2, 256, 128) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_forward_matches_reference_at_three_heads_and_depth_three():
    model, sd = _small(width=192, depth=3, seed=5)
    x = _features(1, seed=7) * 3.0
    with torch.no_grad():
        out = model(x)
    assert (out.double() - _reference_forward(sd, x, 3)).abs().max().item() < 1e-5


def test_every_used_parameter_matters():
    model, sd = _small(width=128, depth=2)
    x = _features(1)
    with torch.no_grad():
        base = model(x)
        for name in ("0.weight", "1.norm.query_norm.scale", "2.norm.key_norm.scale",
                     "1.linear1.bias", "2.linear2.weight", "3.weight", "3.bias"):
            other = without_modulation(sd)
            other[name] = other[name] * 1.5 + 0.1
            changed = Aligner(128, 2, TARGET_SD15)
            changed.load_state_dict(other)
            assert (changed(x) - base).abs().max() > 1e-4, name


def test_modulation_weights_are_dropped():
    sd = official_aligner_state_dict(0, 768, 1)
    scrambled = dict(sd)
    scrambled["1.modulation.lin.weight"] = torch.randn_like(sd["1.modulation.lin.weight"])
    scrambled["1.modulation.lin.bias"] = torch.full_like(sd["1.modulation.lin.bias"], 100.0)
    x = _features(1)
    with torch.no_grad():
        base = Aligner.from_state_dict(sd)(x)
        assert torch.equal(Aligner.from_state_dict(scrambled)(x), base)
        # ... and they are optional (the pack's own files leave them out)
        assert torch.equal(Aligner.from_state_dict(without_modulation(sd))(x), base)


def test_tokens_are_permutation_equivariant():
    """No positional encoding anywhere: permuting input tokens permutes the output."""
    model, _ = _small()
    x = _features(1)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(x)[:, perm], model(x[:, perm]), atol=1e-5)


def test_custom_operations_are_used():
    made = []

    class Linear(torch.nn.Linear):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append("Linear")

        def reset_parameters(self):  # like ComfyUI's ops: no initialisation
            return None

    class LayerNorm(torch.nn.LayerNorm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append("LayerNorm")

    ops = types.SimpleNamespace(Linear=Linear, LayerNorm=LayerNorm)
    sd = official_aligner_state_dict(0, 128, 2)
    model = Aligner(128, 2, TARGET_SD15, operations=ops)
    model.load_state_dict(without_modulation(sd))
    assert made.count("Linear") == 1 + 2 * 2 and made.count("LayerNorm") == 1
    plain, _ = _small()
    x = _features(1)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_dtype_and_device_handling():
    sd = official_aligner_state_dict(0, 768, 1)
    model = Aligner.from_state_dict(sd, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    x = _features(1).double()
    with torch.no_grad():
        out = model(x)
        ref = Aligner.from_state_dict(sd)(x.float())
    assert out.dtype == torch.float32 and out.device == x.device
    assert (out - ref).abs().max() < 0.1  # bf16 rounding only
    stored_half = {k: v.half() for k, v in sd.items()}
    assert next(Aligner.from_state_dict(stored_half).parameters()).dtype == torch.float16


def test_non_finite_features_become_no_context_per_sample():
    model, _ = _small()
    x = _features(2)
    bad = x.clone()
    bad[1, 5, 7] = float("nan")
    with torch.no_grad():
        out = model(bad)
        assert torch.allclose(out[0], model(x[:1])[0], atol=1e-6)
        assert torch.allclose(out[1], model(torch.zeros(1, 256, 512))[0], atol=1e-6)


# --------------------------------------------------------------------------------------
# Conditioning


def test_conditioning_strength_algebra():
    model, _ = _small()
    x = _features(3)
    with torch.no_grad():
        tokens = model(x)
        empty = model(torch.zeros(1, 256, 512))
        pos1, neg1 = model.conditioning(x, 1.0)
        pos0, neg0 = model.conditioning(x, 0.0)
        pos_half, neg_half = model.conditioning(x, 0.5)
    for t in (pos1, neg1, pos0, neg0, pos_half, neg_half):
        assert t.shape == (3, 256, 128) and t.dtype == torch.float32
    for neg in (neg1, neg0, neg_half):
        assert torch.allclose(neg, empty.expand(3, -1, -1), atol=1e-6)
    assert torch.allclose(pos1, tokens, atol=1e-6)
    assert torch.equal(pos0, neg0)
    assert torch.allclose(pos_half, 0.5 * (tokens + empty), atol=1e-6)
    assert torch.allclose(pos_half - neg_half, 0.5 * (pos1 - neg1), atol=1e-6)


def test_conditioning_rejects_bad_strength_and_features():
    model, _ = _small()
    with pytest.raises(InputError):
        model.conditioning(_features(1), float("nan"))
    with pytest.raises(InputError):
        model.conditioning(_features(1), "strong")
    with pytest.raises(InputError, match=r"expected MAE features \[B,256,512\]"):
        model.conditioning(torch.zeros(1, 256, 768))


@pytest.mark.parametrize("bad", [
    torch.zeros(1, 256, 768), torch.zeros(256, 512), torch.zeros(1, 255, 512),
    torch.zeros(1, 4, 64, 64), torch.zeros(0, 256, 512), "features",
])
def test_wrong_feature_shapes_are_input_errors(bad):
    model, _ = _small()
    with pytest.raises(InputError) as e:
        model(bad)
    assert "expected MAE features [B,256,512] from ASUKA_MAEPrior, got" in str(e.value)


# --------------------------------------------------------------------------------------
# Files and targets


def test_official_pt_is_flux_clip(tmp_path):
    path = tmp_path / "asuka_alignment_clip.pt"
    sd = write_official_aligner_pt(path, width=768)
    model = load_aligner(path)
    assert (model.target, model.width, model.depth, model.heads) == (TARGET_FLUX_CLIP, 768, 4, 12)
    own = model.state_dict()
    assert set(own) == set(without_modulation(sd))
    assert all(torch.equal(own[k], sd[k]) for k in own)


def test_sd15_safetensors_is_sd15(tmp_path):
    path = tmp_path / "asuka_sd15_aligner.safetensors"
    write_sd15_aligner(path, seed=3)
    model = load_aligner(path)
    assert (model.target, model.width) == (TARGET_SD15, 768)
    model.expect_target(TARGET_SD15, where="ASUKA SD1.5")


def test_flux_clip_aligner_is_refused_for_sd15(tmp_path):
    path = tmp_path / "asuka_alignment_clip.pt"
    write_official_aligner_pt(path, depth=1)
    model = load_aligner(path)
    with pytest.raises(CheckpointError) as e:
        model.expect_target(TARGET_SD15, where="ASUKA SD1.5 conditioning")
    msg = str(e.value)
    assert "SD1.5" in msg and "pooled" in msg and "No SD1.5 aligner weights are public" in msg
    model.expect_target(TARGET_FLUX_CLIP)


def test_save_aligner_round_trip_and_metadata(tmp_path):
    model, _ = _small(width=128)
    # width 128 is no real target: saving must refuse to write a file that cannot load back
    with pytest.raises(CheckpointError, match="needs 768-d tokens"):
        save_aligner(model, tmp_path / "small.safetensors", target=TARGET_SD15)
    sd = official_aligner_state_dict(2, 768, 2)
    path = tmp_path / "mine.safetensors"
    save_aligner(sd, path, target=TARGET_SD15)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(sd)
    assert meta["asuka.target"] == "sd15" and meta["asuka.kind"] == "aligner"
    loaded = load_aligner(path)
    assert loaded.target == TARGET_SD15
    path2 = tmp_path / "again.safetensors"
    save_aligner(loaded, path2, target=TARGET_SD15)
    with safe_open(str(path2), framework="pt") as f:
        assert set(f.keys()) == set(without_modulation(sd))
        assert torch.equal(f.get_tensor("2.linear2.weight"), sd["2.linear2.weight"])


def test_save_aligner_checks_target_and_extension(tmp_path):
    sd = official_aligner_state_dict(0, 768, 1)
    with pytest.raises(CheckpointError, match="target"):
        save_aligner(sd, tmp_path / "a.safetensors", target="sdxl")
    with pytest.raises(CheckpointError, match=".safetensors"):
        save_aligner(sd, tmp_path / "a.pt", target=TARGET_SD15)
    with pytest.raises(CheckpointError, match="4096"):
        save_aligner(sd, tmp_path / "a.safetensors", target=TARGET_FLUX_T5)


def test_metadata_target_must_fit_the_width():
    sd = official_aligner_state_dict(width=768, depth=1, device="meta")
    with pytest.raises(CheckpointError, match="4096"):
        aligner_config(sd, {"asuka.target": TARGET_FLUX_T5})
    with pytest.raises(CheckpointError, match="known targets"):
        aligner_config(sd, {"asuka.target": "sd21"})
    assert aligner_config(sd, {"asuka.target": TARGET_SD15}).target == TARGET_SD15


def test_unusual_width_without_metadata_is_refused():
    with pytest.raises(CheckpointError, match="cannot tell"):
        aligner_config(official_aligner_state_dict(width=1024, depth=1, device="meta"))


def test_mae_state_dict_is_named_as_such():
    mae = official_mae_state_dict(0, embed_dim=64, depth=1, decoder_dim=32, decoder_depth=1)
    with pytest.raises(CheckpointError) as e:
        load_aligner(mae)
    assert "MAE" in str(e.value) and "load_aligner" in str(e.value)


def test_mae_file_is_named_as_such(tmp_path):
    from tests.fixtures.mae_files import write_official_mae_pth

    path = tmp_path / "mae_300.pth"
    write_official_mae_pth(path, embed_dim=64, depth=1, decoder_dim=32, decoder_depth=1)
    with pytest.raises(CheckpointError, match="mae_300.pth' looks like an ASUKA MAE"):
        load_aligner(path)


def test_file_declaring_another_kind_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file(without_modulation(official_aligner_state_dict(0, 768, 1)), str(path),
              metadata={"asuka.kind": "mae"})
    with pytest.raises(CheckpointError, match="'mae'"):
        load_aligner(path)
