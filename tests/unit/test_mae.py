"""The MAE prior (asuka_core.mae) against independent facts.

* the official key table and parameter totals (architecture reference §2.1/§2.2);
* an independent reference forward written out below from §2.3-§2.8 (official-style
  preprocessing with OpenCV itself, explicit per-head attention with -inf masking,
  convex-mix token substitution, explicit unpatchify), compared on a tiny random model;
* behaviour the official code implies: hole pixels never matter (binary masks), soft-mask
  rules, alpha = 1 is the plain model, fully masked images, batching.

Most tests use a tiny random model (2 encoder blocks of 128, 7 decoder blocks of 64, still
16x16 patches on 256x256), ViT-B only where its shapes are the point.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asuka_core.checkpoint import save_safetensors
from asuka_core.errors import CheckpointError, InputError
from asuka_core.mae import MAE, MAEPrior, infer_config, load_mae, patch_rules, preprocess, sincos_pos_embed
from tests.fixtures.mae_files import (official_mae_shapes, official_mae_state_dict, reference_sincos,
                                      write_official_mae_pth)

TINY = dict(embed_dim=128, depth=2, decoder_dim=64, decoder_depth=7)
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def tiny_sd(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    return official_mae_state_dict(seed, **{**TINY, **kw})


def tiny_model(seed: int = 0, **kw) -> MAE:
    return MAE.from_state_dict(tiny_sd(seed, **kw))


def picture(h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A smooth random picture with uint8-exact levels (as LoadImage gives)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=g)
    img = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    img = img + 0.05 * torch.rand(batch, 3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().div(255).movedim(1, -1).contiguous()


def box(h: int, w: int, top: int, left: int, bh: int, bw: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[:, top:top + bh, left:left + bw] = value
    return m


@pytest.fixture(scope="module")
def vit_b_sd() -> dict[str, torch.Tensor]:
    return official_mae_state_dict(0)


# --------------------------------------------------------------------------------------
# Independent reference (written from the reference document, not from asuka_core)


def ref_prepare(image: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Official prepare_data, with OpenCV: uint8 image -> INTER_AREA 256, /255, ImageNet
    normalise in float64, zero where mask >= 0.5; mask -> INTER_NEAREST 256."""
    xs, ms = [], []
    for img, m in zip(image, mask):
        u8 = np.clip(np.round(img.numpy() * 255.0), 0, 255).astype(np.uint8)
        u8 = cv2.resize(u8, (256, 256), interpolation=cv2.INTER_AREA)
        x = (u8 / 255.0 - MEAN) / STD
        m256 = cv2.resize(m.numpy().astype(np.float32), (256, 256), interpolation=cv2.INTER_NEAREST)
        x = np.einsum("hwc->chw", x) * (m256 < 0.5)
        xs.append(x.astype(np.float32))
        ms.append(m256.astype(np.float32))
    return np.stack(xs), np.stack(ms)


def ref_layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def ref_attention(x, sd, prefix, heads, key_is_hole=None):
    """Explicit multi-head attention; keys of hole patches get logit -inf for every query."""
    n, c = x.shape[-2:]
    hd = c // heads
    qkv = x @ sd[f"{prefix}.qkv.weight"].T + sd[f"{prefix}.qkv.bias"]
    out = torch.zeros_like(x)
    for h in range(heads):
        q = qkv[..., h * hd:(h + 1) * hd]
        k = qkv[..., c + h * hd:c + (h + 1) * hd]
        v = qkv[..., 2 * c + h * hd:2 * c + (h + 1) * hd]
        logits = q @ k.transpose(-1, -2) * hd ** -0.5
        if key_is_hole is not None:
            logits = logits.masked_fill(key_is_hole[:, None, :], float("-inf"))
        out[..., h * hd:(h + 1) * hd] = torch.softmax(logits, dim=-1) @ v
    return out @ sd[f"{prefix}.proj.weight"].T + sd[f"{prefix}.proj.bias"]


def ref_block(x, sd, prefix, heads, key_is_hole=None):
    x = x + ref_attention(ref_layer_norm(x, sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"]),
                          sd, f"{prefix}.attn", heads, key_is_hole)
    hdn = ref_layer_norm(x, sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"])
    hdn = hdn @ sd[f"{prefix}.mlp.fc1.weight"].T + sd[f"{prefix}.mlp.fc1.bias"]
    hdn = 0.5 * hdn * (1 + torch.erf(hdn / math.sqrt(2)))
    return x + hdn @ sd[f"{prefix}.mlp.fc2.weight"].T + sd[f"{prefix}.mlp.fc2.bias"]


def ref_patch_embed(img, weight, bias):
    """Conv 16x16 stride 16 written as a sum over each patch; tokens row-major."""
    b, c = img.shape[:2]
    patches = img.reshape(b, c, 16, 16, 16, 16).permute(0, 2, 4, 1, 3, 5).reshape(b, 256, c, 16, 16)
    return torch.einsum("btcij,dcij->btd", patches, weight) + bias


def ref_forward(sd: dict, x: np.ndarray, m: np.ndarray, heads: int, dec_heads: int):
    """§2.4-§2.8 in float64. Returns (features, reconstruction [B,3,256,256] 0..1)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = torch.from_numpy(x).double()
    m = torch.from_numpy(m).double()[:, None]
    b = x.shape[0]
    f = torch.zeros(b, 256, dtype=torch.float64)
    for r in range(16):
        for c in range(16):
            f[:, 16 * r + c] = m[:, 0, 16 * r:16 * r + 16, 16 * c:16 * c + 16].mean(dim=(1, 2))
    new_mask = (f > 0).double()
    partial = ((f > 0) & (f < 1)).double()

    t = ref_patch_embed(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]) + sd["pos_embed"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        t = ref_block(t, sd, f"blocks.{i}", heads, new_mask > 0)
    t = ref_layer_norm(t, sd["norm.weight"], sd["norm.bias"])

    y = t @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    y = y * (1 - new_mask[..., None]) + sd["mask_token"] * new_mask[..., None]
    if "alpha" in sd:
        e = ref_patch_embed(torch.cat([x * (1 - m), m], dim=1), sd["decoder_patch_embed.proj.weight"],
                            sd["decoder_patch_embed.proj.bias"])
        a = sd["alpha"].clamp(0, 1)
        pm = partial[..., None]
        y = y * (1 - pm) + (y * a + e * (1 - a)) * pm
    y = y + sd["decoder_pos_embed"]
    dec_depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    features = None
    for i in range(dec_depth):
        if i == 6:
            features = y
        y = ref_block(y, sd, f"decoder_blocks.{i}", dec_heads)
    if torch.isnan(features).any():  # the official caller's fallback
        features = torch.zeros_like(features)
    tokens = ref_layer_norm(y, sd["decoder_norm.weight"], sd["decoder_norm.bias"])
    tokens = tokens @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"]
    img = torch.zeros(b, 3, 256, 256, dtype=torch.float64)
    for r in range(16):
        for c in range(16):
            # token vector ordered (row in patch, column in patch, channel)
            img[:, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = \
                tokens[:, 16 * r + c].reshape(b, 16, 16, 3).permute(0, 3, 1, 2)
    img = img * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    return features, img.clamp(0, 1)


# --------------------------------------------------------------------------------------
# Files, keys, config


def test_official_key_table_and_parameter_totals(vit_b_sd):
    sd = vit_b_sd
    assert len(sd) == 256
    assert sum(v.numel() for v in sd.values()) == 112_507_393
    plain = {k: v for k, v in sd.items() if not (k.startswith("decoder_patch_embed.") or k == "alpha")}
    assert len(plain) == 253
    assert sum(v.numel() for v in plain.values()) == 111_982_592
    expected = {
        "pos_embed": (1, 256, 768), "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 256, 512),
        "patch_embed.proj.weight": (768, 3, 16, 16), "blocks.11.attn.qkv.weight": (2304, 768),
        "blocks.0.mlp.fc1.weight": (3072, 768), "norm.bias": (768,), "decoder_embed.weight": (512, 768),
        "decoder_blocks.7.attn.qkv.bias": (1536,), "decoder_blocks.0.mlp.fc2.weight": (512, 2048),
        "decoder_pred.weight": (768, 512), "decoder_patch_embed.proj.weight": (512, 4, 16, 16), "alpha": (),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key


def test_vit_b_loads_with_the_official_config(vit_b_sd):
    model = MAE.from_state_dict(vit_b_sd)
    c = model.config
    assert (c.embed_dim, c.depth, c.num_heads) == (768, 12, 12)
    assert (c.decoder_dim, c.decoder_depth, c.decoder_heads) == (512, 8, 16)
    assert (c.patch_size, c.img_size, c.has_partial_branch) == (16, 256, True)
    assert set(model.state_dict()) == set(vit_b_sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, vit_b_sd[k]), k
    assert not model.training


def test_vit_b_plain_layout_builds_no_partial_branch(vit_b_sd):
    plain = {k: v for k, v in vit_b_sd.items() if not (k.startswith("decoder_patch_embed.") or k == "alpha")}
    model = MAE.from_state_dict(plain)
    assert not model.config.has_partial_branch
    assert set(model.state_dict()) == set(plain)
    assert sum(p.numel() for p in model.state_dict().values()) == 111_982_592


def test_vit_b_encodes(vit_b_sd):
    model = MAE.from_state_dict(vit_b_sd)
    prior = model.encode(picture(256, 256), box(256, 256, 40, 60, 100, 90))
    assert prior.features.shape == (1, 256, 512) and prior.features.dtype == torch.float32
    assert torch.isfinite(prior.features).all() and prior.features.abs().sum() > 0


def test_vit_l_shapes_infer_24_blocks_16_heads():
    shapes = official_mae_shapes(embed_dim=1024, depth=24, finetune=False)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    c = infer_config(meta)
    assert (c.embed_dim, c.depth, c.num_heads, c.decoder_heads) == (1024, 24, 16, 16)
    model = MAE.from_state_dict(meta)  # builds on the meta device: nothing allocated
    assert len(model.blocks) == 24
    assert sum(t.numel() for t in model.state_dict().values()) == 329_631_488  # reference §2.1


def test_heads_convention_for_other_widths():
    meta = {k: torch.empty(s, device="meta") for k, s in official_mae_shapes(embed_dim=384, depth=3, decoder_dim=256,
                                                                              decoder_depth=6).items()}
    c = infer_config(meta)
    assert (c.num_heads, c.decoder_heads, c.depth, c.decoder_depth) == (6, 8, 3, 6)


def test_patch_14_is_refused():
    meta = {k: torch.empty(s, device="meta") for k, s in official_mae_shapes(embed_dim=1280, depth=2, patch_size=14).items()}
    with pytest.raises(CheckpointError, match="14x14"):
        infer_config(meta)


def test_other_token_count_is_refused():
    meta = {k: torch.empty(s, device="meta") for k, s in official_mae_shapes(**TINY, img_size=512).items()}
    with pytest.raises(CheckpointError, match="1024 positions"):
        MAE.from_state_dict(meta)


def test_too_few_decoder_blocks_is_refused():
    meta = {k: torch.empty(s, device="meta") for k, s in official_mae_shapes(**{**TINY, "decoder_depth": 5}).items()}
    with pytest.raises(CheckpointError, match="at least 6"):
        infer_config(meta)


def test_missing_tensor_is_a_clear_error():
    sd = tiny_sd()
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc2.bias"):
        MAE.from_state_dict(sd)


def test_wrong_shape_is_a_clear_error():
    sd = tiny_sd()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(100, 128)
    with pytest.raises(CheckpointError, match="blocks.0.mlp.fc1.weight"):
        MAE.from_state_dict(sd)


def test_extra_keys_are_ignored():
    sd = tiny_sd()
    sd["head.weight"] = torch.zeros(3)
    model = MAE.from_state_dict(sd)
    assert model.ignored_keys == ("head.weight",)


def test_sincos_matches_reference_section_2_7():
    for dim in (768, 512, 64):
        assert torch.equal(sincos_pos_embed(dim), torch.from_numpy(reference_sincos(dim, 16)))


def test_missing_position_tables_are_computed():
    sd = tiny_sd()
    full = MAE.from_state_dict(sd)
    stripped = MAE.from_state_dict({k: v for k, v in sd.items() if "pos_embed" not in k})
    img, mask = picture(256, 256), box(256, 256, 30, 30, 90, 70)
    assert torch.equal(full.encode(img, mask).features, stripped.encode(img, mask).features)


# --------------------------------------------------------------------------------------
# Loading through load_mae


def test_official_pth_with_namespace_loads(tmp_path):
    path = tmp_path / "mae_300.pth"
    sd = write_official_mae_pth(path, **TINY)
    model = load_mae(str(path))
    assert not model.training and model.config.has_partial_branch
    assert torch.equal(model.alpha, sd["alpha"]) and float(model.alpha) == pytest.approx(0.7)
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


def test_mae_far_layout_pth_and_safetensors_load(tmp_path):
    sd = tiny_sd(finetune=False)
    torch.save({"model": sd}, tmp_path / "mae_far.pth")
    save_safetensors(sd, tmp_path / "mae.safetensors")
    a = load_mae(tmp_path / "mae_far.pth")
    b = load_mae(str(tmp_path / "mae.safetensors"))
    assert not a.config.has_partial_branch and not b.config.has_partial_branch
    img, mask = picture(256, 256), box(256, 256, 10, 20, 70, 50)
    assert torch.equal(a.encode(img, mask).features, b.encode(img, mask).features)


def test_sd_checkpoint_is_refused_with_its_kind():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
          "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}
    with pytest.raises(CheckpointError, match="Stable Diffusion"):
        load_mae(sd)


def test_aligner_is_refused_with_its_kind():
    """A (narrow) aligner with the official key names (reference §3.3)."""
    d = 128
    sd = {"0.weight": torch.zeros(d, 512), "0.bias": torch.zeros(d), "5.weight": torch.zeros(d), "5.bias": torch.zeros(d)}
    for b in range(1, 5):
        sd.update({f"{b}.linear1.weight": torch.zeros(7 * d, d), f"{b}.linear1.bias": torch.zeros(7 * d),
                   f"{b}.linear2.weight": torch.zeros(d, 5 * d), f"{b}.linear2.bias": torch.zeros(d),
                   f"{b}.norm.query_norm.scale": torch.ones(64), f"{b}.norm.key_norm.scale": torch.ones(64),
                   f"{b}.modulation.lin.weight": torch.zeros(3 * d, d), f"{b}.modulation.lin.bias": torch.zeros(3 * d)})
    with pytest.raises(CheckpointError, match="aligner"):
        load_mae(sd)


def test_dtype_and_device_arguments():
    model = MAE.from_state_dict(tiny_sd(), dtype=torch.bfloat16, device="cpu")
    assert all(t.dtype == torch.bfloat16 for t in model.state_dict().values())


# --------------------------------------------------------------------------------------
# Parity with the independent reference


def _soft_mask(h: int, w: int) -> torch.Tensor:
    """Binary box, a soft ramp (values 0..1), a faint 0.3 speck and a 0.7 patch."""
    m = torch.zeros(1, h, w)
    m[:, h // 5:h // 2, w // 4:w // 2] = 1.0
    ramp = torch.linspace(0, 1, w // 3)
    m[:, int(h * 0.6):int(h * 0.8), w // 2:w // 2 + w // 3] = ramp
    m[:, 3:5, w - 9:w - 6] = 0.3
    m[:, h - 40:h - 20, 10:40] = 0.7
    return m


@pytest.mark.parametrize("size", [(256, 256), (512, 384), (200, 180)])
def test_features_and_reconstruction_match_reference(size):
    h, w = size
    sd = tiny_sd(3)
    model = MAE.from_state_dict(sd)
    image, mask = picture(h, w, seed=1, batch=2), torch.cat([_soft_mask(h, w), box(h, w, 0, 0, h // 3, w)])
    prior = model.encode(image, mask)

    x, m = ref_prepare(image, mask)
    pixels, mask256 = preprocess(image, mask)
    assert torch.equal(pixels, torch.from_numpy(x)) and torch.equal(mask256[:, 0], torch.from_numpy(m))

    ref_feat, ref_img = ref_forward(sd, x, m, heads=2, dec_heads=2)
    torch.testing.assert_close(prior.features.double(), ref_feat, rtol=1e-4, atol=1e-4)
    assert prior.reconstruction.shape == (2, h, w, 3)
    if size == (256, 256):
        torch.testing.assert_close(prior.reconstruction.double(), ref_img.movedim(1, -1), rtol=1e-4, atol=1e-4)
    else:
        back = F.interpolate(ref_img.float(), size=(h, w), mode="bilinear", align_corners=False,
                             antialias=h < 256 or w < 256).movedim(1, -1)
        torch.testing.assert_close(prior.reconstruction, back.clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_plain_layout_matches_reference():
    sd = tiny_sd(5, finetune=False)
    image, mask = picture(256, 256, seed=2), _soft_mask(256, 256)
    prior = MAE.from_state_dict(sd).encode(image, mask)
    x, m = ref_prepare(image, mask)
    ref_feat, _ = ref_forward(sd, x, m, heads=2, dec_heads=2)
    torch.testing.assert_close(prior.features.double(), ref_feat, rtol=1e-4, atol=1e-4)


def test_sdpa_key_masking_equals_explicit_masked_softmax():
    sd = tiny_sd(1)
    model = MAE.from_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, 128, generator=g)
    hole = torch.rand(3, 256, generator=g) < 0.4
    ours = model.blocks[0].attn(x, (~hole)[:, None, None, :])
    ref = ref_attention(x.double(), {k: v.double() for k, v in sd.items()}, "blocks.0.attn", 2, hole)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    # and masked keys really have no influence: scramble them
    x2 = torch.where(hole[..., None], torch.randn_like(x) * 100, x)
    out2 = model.blocks[0].attn(x2, (~hole)[:, None, None, :])
    torch.testing.assert_close(out2[~hole], ours[~hole], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Behaviour


@pytest.mark.parametrize("size", [(256, 256), (512, 512)])
def test_hole_pixels_change_nothing_for_a_binary_mask(size):
    """Hole content is blanked before the encoder; at 256 (or an integer factor, with the
    mask aligned to the factor) it cannot even leak through the resize."""
    h, w = size
    s = h // 256
    model = tiny_model(2)
    mask = box(h, w, 70 * s, 38 * s, 100 * s, 60 * s)  # cuts through patches; edges on multiples of s
    a = picture(h, w, seed=3)
    b = torch.where(mask[..., None] > 0, torch.rand(1, h, w, 3), a)
    pa, pb = model.encode(a, mask), model.encode(b, mask)
    assert torch.equal(pa.features, pb.features)
    assert torch.equal(pa.reconstruction, pb.reconstruction)
    assert torch.equal(pa.patch_mask, pb.patch_mask)
    assert patch_rules(preprocess(a, mask)[1])[1].any()  # partial patches (and their branch) are exercised
    # whereas a known pixel does matter
    c = a.clone()
    c[:, 0:8, 0:8] = 1.0 - c[:, 0:8, 0:8]
    assert not torch.equal(model.encode(c, mask).features, pa.features)


def test_alpha_one_equals_the_plain_model():
    image, mask = picture(256, 256, seed=4), _soft_mask(256, 256)
    finetune = MAE.from_state_dict(tiny_sd(6, alpha=1.0))
    plain = MAE.from_state_dict(tiny_sd(6, finetune=False))
    assert torch.equal(finetune.encode(image, mask).features, plain.encode(image, mask).features)
    # alpha > 1 is clamped to 1; a missing alpha is the official initial value 1
    over = MAE.from_state_dict(tiny_sd(6, alpha=1.5))
    no_alpha = MAE.from_state_dict({k: v for k, v in tiny_sd(6).items() if k != "alpha"})
    assert torch.equal(over.encode(image, mask).features, plain.encode(image, mask).features)
    assert torch.equal(no_alpha.encode(image, mask).features, plain.encode(image, mask).features)


def test_partial_branch_changes_partial_patches_only_when_present():
    image = picture(256, 256, seed=5)
    finetune = MAE.from_state_dict(tiny_sd(7, alpha=0.3))
    plain = MAE.from_state_dict(tiny_sd(7, finetune=False))
    aligned = box(256, 256, 64, 32, 64, 96)              # whole patches only: no partial patch
    assert torch.equal(finetune.encode(image, aligned).features, plain.encode(image, aligned).features)
    ragged = box(256, 256, 60, 30, 70, 101)              # cuts through patches
    diff = (finetune.encode(image, ragged).features - plain.encode(image, ragged).features).abs()
    assert diff.max() > 1e-3


def test_soft_mask_rules():
    image = picture(256, 256, seed=6)
    mask = torch.zeros(1, 256, 256)
    mask[0, 5, 5] = 0.3          # patch 0: faint speck -> hole (and partial), pixel not blanked
    mask[0, 5, 21] = 0.6         # patch 1: >= 0.5 -> hole, pixel blanked
    mask[0, 0:16, 32:48] = 1.0   # patch 2: fully covered -> hole, not partial
    mask[0, 0:16, 48:64] = 0.3   # patch 3: uniformly faint -> hole and partial (f = 0.3 < 1)
    pixels, mask256 = preprocess(image, mask)
    expected = torch.from_numpy(ref_prepare(image, torch.zeros(1, 256, 256))[0])
    assert torch.equal(pixels[0, :, 5, 5], expected[0, :, 5, 5]) and pixels[0, :, 5, 5].abs().sum() > 0
    assert torch.equal(pixels[0, :, 5, 21], torch.zeros(3))
    assert torch.equal(pixels[0, :, 0:16, 48:64], expected[0, :, 0:16, 48:64])
    hole, partial = patch_rules(mask256)
    assert hole[0, :5].tolist() == [True, True, True, True, False]
    assert partial[0, :5].tolist() == [True, True, False, True, False]
    prior = tiny_model().encode(image, mask)
    assert prior.patch_mask[0, :5].tolist() == [True, True, True, True, False]
    assert int(prior.patch_mask.sum()) == 4


def test_fully_masked_image_gives_zero_features_and_leaves_neighbours_alone():
    model = tiny_model(8)
    images = picture(256, 256, seed=7, batch=3)
    grid = torch.zeros(1, 256, 256)
    grid[:, :, ::16] = 1.0  # one hole column in every patch: every patch touched, none fully
    grid[:, ::16, :] = 1.0
    masks = torch.cat([box(256, 256, 20, 20, 60, 60), grid, box(256, 256, 100, 140, 50, 80)])
    prior = model.encode(images, masks)
    assert prior.fully_masked.tolist() == [False, True, False]
    assert torch.equal(prior.features[1], torch.zeros(256, 64))
    assert torch.isfinite(prior.reconstruction).all() and torch.isfinite(prior.features).all()
    for i in (0, 2):
        alone = model.encode(images[i:i + 1], masks[i:i + 1])
        torch.testing.assert_close(prior.features[i:i + 1], alone.features, rtol=1e-5, atol=1e-5)
    full = model.encode(images[1:2], torch.ones(1, 256, 256))
    assert full.fully_masked.all() and torch.equal(full.features, torch.zeros(1, 256, 64))
    assert torch.isfinite(full.reconstruction).all()
    assert 0 <= float(full.reconstruction.min()) and float(full.reconstruction.max()) <= 1


def test_one_mask_for_three_images():
    model = tiny_model(9)
    images = picture(200, 300, seed=8, batch=3)
    mask = box(200, 300, 50, 60, 70, 90)
    prior = model.encode(images, mask)
    assert prior.features.shape == (3, 256, 64) and prior.reconstruction.shape == (3, 200, 300, 3)
    for i in range(3):
        alone = model.encode(images[i:i + 1], mask)
        torch.testing.assert_close(prior.features[i:i + 1], alone.features, rtol=1e-5, atol=1e-5)
        assert torch.equal(prior.patch_mask[i], alone.patch_mask[0])


def test_chunking_and_progress():
    model = tiny_model(10)
    images = picture(128, 160, seed=9, batch=5)
    masks = torch.cat([box(128, 160, 10 * i, 8, 40, 50) for i in range(5)])
    calls = []
    chunked = model.encode(images, masks, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    whole = model.encode(images, masks, batch_size=8)
    torch.testing.assert_close(chunked.features, whole.features, rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked.patch_mask, whole.patch_mask)


def test_progress_can_cancel():
    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        tiny_model().encode(picture(64, 64, batch=3), box(64, 64, 5, 5, 20, 20), batch_size=1, progress=cancel)


def test_empty_mask_is_an_input_error():
    with pytest.raises(InputError, match="Nothing to inpaint"):
        tiny_model().encode(picture(64, 64), torch.zeros(1, 64, 64))


def test_prior_to_moves_everything():
    prior = tiny_model().encode(picture(64, 64), box(64, 64, 5, 5, 20, 20))
    moved = prior.to("meta")
    assert isinstance(moved, MAEPrior)
    assert {t.device.type for t in (moved.features, moved.reconstruction, moved.patch_mask, moved.fully_masked)} == {"meta"}


def test_bfloat16_is_close_to_float32():
    sd = tiny_sd(11)
    image, mask = picture(256, 256, seed=10), _soft_mask(256, 256)
    f32 = MAE.from_state_dict(sd).encode(image, mask)
    b16 = MAE.from_state_dict(sd, dtype=torch.bfloat16).encode(image, mask)
    assert b16.features.dtype == torch.float32 and b16.reconstruction.dtype == torch.float32
    cos = F.cosine_similarity(f32.features.flatten(), b16.features.flatten(), dim=0)
    assert cos > 0.999


# --------------------------------------------------------------------------------------
# ComfyUI-style layer classes


def _nan_init(module: nn.Module) -> None:
    for p in module.parameters(recurse=False):
        with torch.no_grad():
            p.fill_(float("nan"))


class CastOps:
    """Like comfy.ops.manual_cast: no weight init (NaN here, to catch anything not loaded),
    weights cast to the input's dtype at call time."""

    class Linear(nn.Linear):
        def reset_parameters(self):
            _nan_init(self)

        def forward(self, x):
            return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    class Conv2d(nn.Conv2d):
        def reset_parameters(self):
            _nan_init(self)

        def forward(self, x):
            return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    class LayerNorm(nn.LayerNorm):
        def reset_parameters(self):
            _nan_init(self)

        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def test_operations_are_used_and_compute_dtype_is_honoured():
    sd16 = {k: v.to(torch.bfloat16) for k, v in tiny_sd(12).items()}
    cast = MAE.from_state_dict(sd16, operations=CastOps)
    assert isinstance(cast.blocks[0].attn.qkv, CastOps.Linear)
    assert isinstance(cast.patch_embed.proj, CastOps.Conv2d) and isinstance(cast.norm, CastOps.LayerNorm)
    cast.compute_dtype = torch.float32           # bf16 storage, float32 maths
    reference = MAE.from_state_dict({k: v.float() for k, v in sd16.items()})
    image, mask = picture(256, 256, seed=11), _soft_mask(256, 256)
    a, b = cast.encode(image, mask), reference.encode(image, mask)
    assert torch.isfinite(a.features).all()
    torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# What the prior sees of the hole (web/docs/ASUKA_MAEPrior.md, docs/mae.md)

_REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))


def _doc(*parts: str) -> str:
    with open(__import__("os").path.join(_REPO, *parts), encoding="utf-8") as f:
        return " ".join(f.read().split())


def test_hole_content_reaches_the_prior_only_at_the_hole_edge():
    """Deep inside the hole, the picture does not matter; at an edge that the 2x
    INTER_AREA downscale straddles (hole from an odd pixel), it does: a 256-pixel that the
    nearest-resized mask calls visible averages a visible and a hole pixel."""
    model = tiny_model(3)
    image = picture(512, 512, seed=4)
    mask = box(512, 512, 129, 129, 254, 254)          # hole starts on an odd pixel
    base = model.encode(image, mask).features
    inside = image.clone()
    inside[:, 180:330, 180:330] = 1.0 - inside[:, 180:330, 180:330]
    assert torch.equal(model.encode(inside, mask).features, base)
    edge = image.clone()
    edge[:, 129, 129:383] = 1.0 - edge[:, 129, 129:383]  # first hole row
    assert not torch.equal(model.encode(edge, mask).features, base)
    page = _doc("web", "docs", "ASUKA_MAEPrior.md")
    assert "never changes the prior" not in page and "Near the hole's edge it can" in page


def test_docs_name_the_keys_that_identify_an_mae():
    """docs/mae.md must name what checkpoint.identify really looks for."""
    from asuka_core.checkpoint import KIND_MAE, identify

    sd = tiny_sd()
    stripped = {k: v for k, v in sd.items() if "pos_embed" not in k}
    assert identify(stripped) == KIND_MAE
    load_mae(stripped)                                  # no position tables: loads (recomputed)
    for key in ("patch_embed.proj.weight", "decoder_embed.weight"):
        assert identify({k: v for k, v in sd.items() if k != key}) != KIND_MAE
    text = _doc("docs", "mae.md")
    assert "by `patch_embed.proj.weight` and `decoder_embed.weight` both being present" in text
    assert "`pos_embed` being present" not in text
