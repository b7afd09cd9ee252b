"""Masked decoders (asuka_core.decoder, asuka_core.tiling).

Oracles: diffusers' AsymmetricAutoencoderKL (for the "avq" family, same random weights),
and an independent functional re-statement of the ASUKA rules written below (for "asuka").
Most tests use narrow random configs (base width 32) and small images to stay fast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asuka_core import checkpoint as ckpt_mod
from asuka_core.decoder import (
    KIND_ASUKA, KIND_AVQ, MaskedDecoder, _upsample_nearest, canonical_weights, decode_memory_estimate,
    infer_config, load_decoder,
)
from asuka_core.errors import CheckpointError, InputError
from asuka_core.imaging import composite
from asuka_core.tiling import MIN_TILE, Tile, TileGrid, decode_tiled, feather, hole_regions, region_share, tile_grid
from tests.fixtures.decoder_files import (
    ASUKA_CONFIG, asuka_decoder_state_dict, avq_ldm_state_dict, condition_widths, diffusers_asym_vae,
    diffusers_to_ldm, ldm_decoder_shapes, write_diffusers_folder, write_official_asuka_decoder_ckpt,
)

TINY = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)


def _inputs(seed: int, batch: int, lh: int, lw: int, channels: int, soft: bool = True):
    """Random latent, IMAGE [B,H,W,3] and MASK [B,H,W] with a rectangle hole, soft edges,
    an isolated one-pixel hole and (if soft) fractional values."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, channels, lh, lw, generator=g)
    image = torch.rand(batch, lh * 8, lw * 8, 3, generator=g)
    mask = torch.zeros(batch, lh * 8, lw * 8)
    mask[:, 8:lh * 4 + 3, lw * 2:lw * 6 - 5] = 1.0
    mask[:, lh * 8 - 3, 5] = 1.0
    if soft:
        mask[:, 5:8, lw * 2:lw * 6 - 5] = torch.rand(batch, 3, lw * 4 - 5, generator=g)
    return z, image, mask


def _model_space(image: torch.Tensor, mask: torch.Tensor):
    return image.movedim(-1, 1) * 2 - 1, mask[:, None]


@pytest.fixture(scope="module")
def diffusers_vae():
    pytest.importorskip("diffusers")
    return diffusers_asym_vae(seed=3)


@pytest.fixture(scope="module")
def tiny_asuka_sd():
    return asuka_decoder_state_dict(seed=5, z_channels=16, **TINY)


@pytest.fixture(scope="module")
def tiny_asuka(tiny_asuka_sd):
    return load_decoder(tiny_asuka_sd)


# --------------------------------------------------------------------------------------
# (1) Parity with diffusers AsymmetricAutoencoderKL


def _diffusers_decode(vae, z, image, mask):
    img, msk = _model_space(image, mask)
    with torch.no_grad():
        return vae.decode(z, image=img, mask=msk).sample


def _assert_parity(decoder: MaskedDecoder, vae, seed: int = 0):
    assert decoder.kind == KIND_AVQ and decoder.latent_channels == 4
    z, image, mask = _inputs(seed, batch=2, lh=8, lw=12, channels=4)
    ref = _diffusers_decode(vae, z, image, mask)
    with torch.no_grad():
        raw = decoder(z, *_model_space(image, mask))
    assert (raw - ref).abs().max().item() < 1e-4            # model space, before clamping
    # decode() thresholds the mask at 0.5 first, as the AVQ script and diffusers' pipeline do
    out = decoder.decode(z, image, mask)
    expected = ((_diffusers_decode(vae, z, image, (mask >= 0.5).float()) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert out.shape == (2, 64, 96, 3) and out.dtype == torch.float32
    assert (out - expected).abs().max().item() < 1e-4
    # the comparison is not vacuous: the output varies and is not all clamped
    assert expected.std() > 0.05 and ((expected > 0) & (expected < 1)).float().mean() > 0.5


def test_parity_with_diffusers_state_dict(diffusers_vae):
    sd = dict(diffusers_vae.state_dict())
    _assert_parity(load_decoder(sd), diffusers_vae)
    bare = {k.removeprefix("decoder."): v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))}
    _assert_parity(load_decoder(bare), diffusers_vae, seed=4)      # decoder + post_quant_conv only


def test_parity_with_diffusers_safetensors_file(diffusers_vae, tmp_path):
    path = tmp_path / "asym.safetensors"
    ckpt_mod.save_safetensors(diffusers_vae.state_dict(), path)
    _assert_parity(load_decoder(path), diffusers_vae, seed=1)


def test_parity_with_diffusers_folder(tmp_path):
    pytest.importorskip("diffusers")
    vae = write_diffusers_folder(tmp_path / "asymmetric-autoencoder-kl-tiny", seed=11)
    assert (tmp_path / "asymmetric-autoencoder-kl-tiny" / "config.json").is_file()
    _assert_parity(load_decoder(tmp_path / "asymmetric-autoencoder-kl-tiny"), vae, seed=2)


def test_original_avq_naming_matches_diffusers(diffusers_vae):
    """The same weights under the original ldm names (plus the extras of an AVQ Lightning
    file) decode exactly like diffusers."""
    ldm = diffusers_to_ldm(dict(diffusers_vae.state_dict()))
    ldm.update({"quant_conv.weight": torch.zeros(8, 8, 1, 1), "loss.logvar": torch.zeros(()),
                "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)})
    for j, (c_in, c_out) in enumerate(reversed(condition_widths(32, 64)[0])):
        ldm[f"decoder.up_layers.{j}.deconv.weight"] = torch.zeros(c_in, c_out, 4, 4)
    assert ckpt_mod.identify(ldm) == ckpt_mod.KIND_AVQ_DECODER
    _assert_parity(load_decoder(ldm), diffusers_vae, seed=3)


# --------------------------------------------------------------------------------------
# (2) Official ASUKA file: names, shapes, counts, loading from the Lightning .ckpt


def test_official_asuka_layout_and_ckpt_loading(tmp_path):
    path = tmp_path / "asuka_decoder.ckpt"
    sd = write_official_asuka_decoder_ckpt(path, seed=0)
    decoder_keys = [k for k in sd if k.startswith("decoder.")]
    assert len(decoder_keys) == 156
    total = sum(sd[k].numel() for k in decoder_keys)
    unused = sum(sd[k].numel() for k in decoder_keys if k.startswith("decoder.up_layers."))
    assert (total, unused) == (75_538_435, 15_205_760)
    assert any(k.startswith("encoder.") for k in sd) and any(k.startswith("loss.") for k in sd)

    decoder = load_decoder(path)     # Lightning pickle, read without executing code
    assert decoder.kind == KIND_ASUKA and decoder.latent_channels == 16
    cfg = decoder.config
    assert cfg.widths == (128, 256, 512, 512) and cfg.blocks == (3, 3, 3, 3) and cfg.mid_channels == 512
    assert [(c.in_channels, c.out_channels, c.kernel) for c in cfg.cond_layers] == [
        (4, 128, 3), (128, 256, 3), (256, 512, 4), (512, 512, 4), (512, 512, 4)]
    assert not cfg.post_quant_conv and decoder.post_quant_conv is None
    assert sum(p.numel() for p in decoder.parameters()) == 75_538_435 - 15_205_760 == 60_332_675
    assert len(decoder.state_dict()) == 156 - 8

    # the values are the file's (attention 1x1 convs become linear weights)
    assert torch.equal(decoder.up[1].block[0].nin_shortcut.weight, sd["decoder.up.1.block.0.nin_shortcut.weight"])
    assert torch.equal(decoder.mid.attn_1.q.weight, sd["decoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert torch.equal(decoder.condition_encoder.layers[0].weight, sd["decoder.encoder.layers.0.weight"])

    z, image, mask = _inputs(0, batch=1, lh=4, lw=4, channels=16)
    out = decoder.decode(z, image, mask)
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(out).all()


def _meta(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("ch, nrb, total_m, used_m", [(128, 2, 75.5, 60.3), (192, 3, 194.3, 160.1),
                                                      (256, 5, 432.8, 372.0)])
def test_avq_variant_sizes_are_read_from_tensors(ch, nrb, total_m, used_m):
    """Reference §4.9 parameter counts; architecture inferred from shapes (meta tensors, no memory)."""
    shapes = ldm_decoder_shapes(z_channels=4, ch=ch, ch_mult=(1, 2, 4, 4), num_res_blocks=nrb, cond_in=3)
    shapes.update({"post_quant_conv.weight": (4, 4, 1, 1), "post_quant_conv.bias": (4,)})
    dec = {k: s for k, s in shapes.items() if k.startswith("decoder.")}
    assert round(sum(math.prod(s) for s in dec.values()) / 1e6, 1) == total_m
    cfg = infer_config(canonical_weights(ckpt_mod.Checkpoint(_meta(shapes))))
    assert cfg.kind == KIND_AVQ and cfg.post_quant_conv and cfg.latent_channels == 4
    assert cfg.widths == (ch, 2 * ch, 4 * ch, 4 * ch) and cfg.blocks == (nrb + 1,) * 4
    assert cfg.cond_layers[0].in_channels == 3 and cfg.cond_layers[-1].out_channels == 4 * ch
    used = sum(math.prod(s) for k, s in dec.items() if ".up_layers." not in k)
    assert round(used / 1e6, 1) == used_m


def test_original_avq_ckpt_loads(tmp_path):
    sd = avq_ldm_state_dict(seed=2, **TINY)
    decoder = load_decoder(sd)
    assert decoder.kind == KIND_AVQ and decoder.post_quant_conv is not None
    assert torch.equal(decoder.post_quant_conv.weight, sd["post_quant_conv.weight"])


# --------------------------------------------------------------------------------------
# (3) Independent statement of the forward rules (ASUKA §4.4; AVQ for comparison)


def reference_decode(sd: dict[str, torch.Tensor], z, image, mask, kind: str) -> torch.Tensor:
    """Direct, functional transcription of the rules from ldm-named weights.

    Differences in formulation from the module on purpose: attention by explicit bmm and
    softmax; upsampling by repeat_interleave; ASUKA level masks by an explicit reshape-mean
    over each f x f cell then "> 0"; AVQ level masks by strided pixel picking; per-level
    replacement with torch.where; condition features looked up by full shape in a dict.
    """
    def p(name):
        return sd["decoder." + name]

    def conv(x, name, stride=1):
        w = p(name + ".weight")
        return F.conv2d(x, w, p(name + ".bias"), stride=stride, padding=1 if w.shape[-1] > 1 else 0)

    def norm_act(x, name):
        y = F.group_norm(x, 32, p(name + ".weight"), p(name + ".bias"), eps=1e-6)
        return y * torch.sigmoid(y)

    def resnet(x, name):
        h = conv(norm_act(x, name + ".norm1"), name + ".conv1")
        h = conv(norm_act(h, name + ".norm2"), name + ".conv2")
        if "decoder." + name + ".nin_shortcut.weight" in sd:
            x = conv(x, name + ".nin_shortcut")
        return x + h

    def attention(x, name):
        b, c, hh, ww = x.shape
        y = F.group_norm(x, 32, p(name + ".norm.weight"), p(name + ".norm.bias"), eps=1e-6)
        q, k, v = (conv(y, f"{name}.{n}").reshape(b, c, hh * ww) for n in "qkv")
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(c), dim=2)   # [b, q, k]
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + conv(out, name + ".proj_out")

    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up."))
    if kind == KIND_AVQ:
        z = F.conv2d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    h = conv(z, "conv_in")
    h = resnet(attention(resnet(h, "mid.block_1"), "mid.attn_1"), "mid.block_2")

    masked = image * (1 - mask)
    x = torch.cat([masked, mask], 1) if kind == KIND_ASUKA else masked
    by_shape = {}
    n = 0
    while f"decoder.encoder.layers.{n}.weight" in sd:
        if n:
            x = torch.relu(x)
        x = conv(x, f"encoder.layers.{n}", stride=1 if p(f"encoder.layers.{n}.weight").shape[-1] == 3 else 2)
        by_shape[tuple(x.shape)] = x
        n += 1

    full_h, full_w = mask.shape[-2:]
    for level in reversed(range(levels)):
        f = full_h // h.shape[-2]
        if kind == KIND_ASUKA:
            cells = mask.reshape(mask.shape[0], 1, full_h // f, f, full_w // f, f).mean(dim=(3, 5))
            hole = cells > 0
        else:
            hole = mask[:, :, ::f, ::f] > 0.5
        h = torch.where(hole, h, by_shape[tuple(h.shape)])
        j = 0
        while f"decoder.up.{level}.block.{j}.conv1.weight" in sd:
            h = resnet(h, f"up.{level}.block.{j}")
            j += 1
        if level:
            h = conv(h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), f"up.{level}.upsample.conv")
    h = h * mask + by_shape[tuple(h.shape)] * (1 - mask)
    return conv(norm_act(h, "norm_out"), "conv_out")


def test_asuka_rules_match_independent_reference(tiny_asuka, tiny_asuka_sd):
    z, image, mask = _inputs(7, batch=2, lh=8, lw=6, channels=16, soft=True)
    img, msk = _model_space(image, mask)
    with torch.no_grad():
        got = tiny_asuka(z, img, msk)
        ref = reference_decode(tiny_asuka_sd, z, img, msk, KIND_ASUKA)
    assert (got - ref).abs().max().item() < 1e-4
    assert ref.std() > 0.1


def test_avq_rules_match_independent_reference():
    sd = avq_ldm_state_dict(seed=4, **TINY)
    decoder = load_decoder(sd)
    z, image, mask = _inputs(8, batch=1, lh=6, lw=8, channels=4, soft=False)   # AVQ thresholds its masks
    img, msk = _model_space(image, mask)
    with torch.no_grad():
        assert (decoder(z, img, msk) - reference_decode(sd, z, img, msk, KIND_AVQ)).abs().max().item() < 1e-4


def test_level_mask_rules(tiny_asuka):
    """ASUKA: any hole pixel makes its cell a hole (area average > 0). AVQ: nearest picks
    one pixel per cell, so an isolated hole pixel off the sampling grid disappears."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[0, 0, 19, 43] = 0.2
    for size, cell in (((8, 8), (2, 5)), ((16, 16), (4, 10)), ((32, 32), (9, 21))):
        m = tiny_asuka.level_mask(mask, size)
        assert m.sum() == 1 and m[0, 0, cell[0], cell[1]] == 1
    avq = load_decoder(avq_ldm_state_dict(seed=1, **TINY))
    assert avq.level_mask(mask, (8, 8)).sum() == 0
    mask[0, 0, 16, 40] = 1.0
    assert avq.level_mask(mask, (8, 8))[0, 0, 2, 5] == 1


def test_upsample_in_own_dtype_is_bit_identical_to_float32_route():
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(1, 8, 5, 7).to(dtype)
        via_fp32 = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(dtype)
        assert torch.equal(_upsample_nearest(x), via_fp32)


# --------------------------------------------------------------------------------------
# (4) Tiling


@pytest.mark.parametrize("h, w, tile, overlap", [
    (23, 17, 9, 3), (17, 23, 8, 0), (30, 30, 10, 7), (16, 16, 8, 4), (5, 40, 8, 2), (12, 12, 30, 16),
    (64, 9, 13, 5),
])
def test_tile_grid_covers_everything(h, w, tile, overlap):
    grid = tile_grid(h, w, tile, overlap)
    assert grid.overlap == max(0, min(overlap, tile // 2))
    cover = torch.zeros(h, w, dtype=torch.int32)
    for t in grid.tiles:
        assert 0 <= t.y and t.y + t.height <= h and 0 <= t.x and t.x + t.width <= w
        assert (t.height, t.width) == (min(tile, h), min(tile, w))
        cover[t.y:t.y + t.height, t.x:t.x + t.width] += 1
    assert (cover > 0).all()
    for starts in (sorted({t.y for t in grid.tiles}), sorted({t.x for t in grid.tiles})):
        assert all(b - a <= tile - grid.overlap for a, b in zip(starts, starts[1:]))


def _local_decode(z, image, mask):
    """A stand-in decoder whose output at a pixel depends on that pixel's inputs only, so
    tiling must reproduce it exactly."""
    up = z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3)
    return torch.tanh(up) * mask + image * (1 - mask)


@pytest.mark.parametrize("h, w, tile, overlap", [(23, 17, 9, 3), (17, 23, 8, 0), (30, 30, 10, 7), (9, 31, 12, 4)])
def test_tiled_blend_is_exact_for_a_local_decoder(h, w, tile, overlap):
    z, image, mask = _inputs(1, batch=2, lh=h, lw=w, channels=4)
    img, msk = _model_space(image, mask)
    calls = []
    grid = tile_grid(h, w, tile, overlap)
    tiled = decode_tiled(_local_decode, z, img, msk, scale=8, grid=grid, progress=lambda d, t: calls.append((d, t)))
    assert torch.allclose(tiled, _local_decode(z, img, msk), atol=1e-6)
    n = len(grid.tiles)
    assert n > 1 and calls == [(i, n) for i in range(1, n + 1)]


def test_feathering_turns_tile_offsets_into_gradual_ramps():
    """If each tile came out with its own colour offset, the blend must not show a step:
    neighbouring pixels differ by at most (offset step) / (ramp width)."""
    h = w = 24
    tile, overlap = 12, 4
    grid = tile_grid(h, w, tile, overlap)
    offsets = iter(range(len(grid.tiles)))

    def per_tile_constant(z, image, mask):
        return torch.full((1, 3, z.shape[-2] * 8, z.shape[-1] * 8), float(next(offsets)))

    z, image, mask = _inputs(0, batch=1, lh=h, lw=w, channels=4)
    out = decode_tiled(per_tile_constant, z, *_model_space(image, mask), scale=8, grid=grid)
    max_step = max(out.diff(dim=2).abs().max(), out.diff(dim=3).abs().max()).item()
    ramp_px = overlap * 8
    assert max_step <= (len(grid.tiles) - 1) / ramp_px * 1.01
    assert max_step < 0.25    # versus a jump of 1..3 without feathering


def test_feather_weights_positive_and_unramped_on_borders():
    grid = TileGrid([Tile(0, 0, 10, 10), Tile(0, 6, 10, 10)], 4, 10, 16)
    left, right = feather(grid.tiles[0], grid, 8), feather(grid.tiles[1], grid, 8)
    assert (left > 0).all() and (right > 0).all()
    assert torch.all(left[:, :40] == 1) and left[0, -1] < 0.02     # ramps only toward the neighbour
    assert torch.all(right[:, -40:] == 1) and right[0, 0] < 0.02


class _LocalOps:
    """torch.nn layers, except GroupNorm normalises each pixel over all its channels
    instead of over the whole image: with the mid attention switched off (zero output
    projection), the decoder then has no global operation, only convolutions of a finite
    reach, so tiles must reproduce the whole decode exactly away from tile borders.
    (Over all channels, not per group: the tiny decoders' 32-wide levels have one channel
    per group, which a per-pixel group norm would flatten to its bias.)"""

    Linear, Conv2d = nn.Linear, nn.Conv2d

    class GroupNorm(nn.GroupNorm):
        def forward(self, x):
            g = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + self.eps)
            return g * self.weight[:, None, None] + self.bias[:, None, None]


def test_tiles_are_exact_where_a_local_decoder_cannot_see_a_tile_border(tiny_asuka_sd):
    """Exactness, not a tolerance: with no global operation (see _LocalOps), a tile's pixel
    that is farther than the decoder's reach from every border the tile shares with a
    neighbour sees exactly what the whole decode sees there."""
    sd = dict(tiny_asuka_sd)
    for name in ("weight", "bias"):
        sd[f"decoder.mid.attn_1.proj_out.{name}"] = torch.zeros_like(sd[f"decoder.mid.attn_1.proj_out.{name}"])
    local = load_decoder(sd, operations=_LocalOps)
    reach = local.config.reach_px
    lh, lw, tile, overlap = 4, 64, 32, 8                      # tiles span the height: borders are vertical
    z, image, mask = _inputs(0, batch=1, lh=lh, lw=lw, channels=16)
    whole = local.decode(z, image, mask)
    calls = []
    tiled = local.decode(z, image, mask, tile_size=tile, tile_overlap=overlap, progress=lambda d, t: calls.append(d))
    grid = tile_grid(lh, lw, tile, overlap)
    assert calls == list(range(1, len(grid.tiles) + 1)) and len(grid.tiles) == 3
    inner_edges = sorted({t.x * 8 for t in grid.tiles if t.x > 0} | {(t.x + t.width) * 8 for t in grid.tiles
                                                                      if t.x + t.width < lw})
    x = torch.arange(lw * 8)
    far = torch.ones(lw * 8, dtype=torch.bool)
    for edge in inner_edges:
        far &= (x - edge).abs() >= reach
    assert far.sum() >= 48                                     # the check covers real columns
    assert torch.allclose(tiled[:, :, far], whole[:, :, far], atol=1e-6)
    assert not torch.equal(tiled, whole)                       # near the borders tiles do differ


def test_tile_as_large_as_the_latent_is_the_whole_decode(tiny_asuka):
    z, image, mask = _inputs(0, batch=1, lh=8, lw=12, channels=16, soft=False)
    assert torch.equal(tiny_asuka.decode(z, image, mask, tile_size=40), tiny_asuka.decode(z, image, mask))


def test_tiled_decode_odd_sizes_and_batches(tiny_asuka):
    z, image, mask = _inputs(4, batch=2, lh=19, lw=11, channels=16)
    calls = []
    out = tiny_asuka.decode(z, image, mask, tile_size=9, tile_overlap=5, progress=lambda d, t: calls.append((d, t)))
    assert out.shape == (2, 152, 88, 3) and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    n = len(tile_grid(19, 11, 9, 5).tiles)
    assert calls == [(i, 2 * n) for i in range(1, 2 * n + 1)]
    with pytest.raises(InputError, match="at least"):
        tiny_asuka.decode(z, image, mask, tile_size=MIN_TILE - 1)


# --------------------------------------------------------------------------------------
# (5) Input validation


def test_latent_channel_mismatch_is_explained(tiny_asuka):
    z, image, mask = _inputs(0, batch=1, lh=4, lw=4, channels=4)
    with pytest.raises(InputError) as e:
        tiny_asuka.decode(z, image, mask)
    msg = str(e.value)
    assert "FLUX latents (16 channels)" in msg and "your latent has 4 (SD1.5)" in msg


def test_size_errors_are_explained(tiny_asuka):
    z, image, mask = _inputs(0, batch=1, lh=4, lw=6, channels=16)
    with pytest.raises(InputError, match=r"IMAGE is 40x32 but the latent is 6x4 cells, which decodes to 48x32"):
        tiny_asuka.decode(z, image[:, :, :40], mask[:, :, :40])
    with pytest.raises(InputError, match=r"IMAGE is 44x32 but the latent is 6x4 cells"):
        tiny_asuka.decode(z, image[:, :, :44], mask[:, :, :44])   # 44 // 8 = 5 cells, not 6
    with pytest.raises(InputError, match=r"\[batch, channels, height, width\]"):
        tiny_asuka.decode(z[0], image, mask)


def test_non_finite_latent_is_rejected(tiny_asuka):
    z, image, mask = _inputs(0, batch=1, lh=4, lw=4, channels=16)
    for bad in (float("nan"), float("inf")):
        z2 = z.clone()
        z2[0, 3, 1, 2] = bad
        with pytest.raises(InputError, match="NaN or infinite"):
            tiny_asuka.decode(z2, image, mask)


def test_batch_rules(tiny_asuka):
    z, image, mask = _inputs(0, batch=2, lh=4, lw=4, channels=16)
    both = tiny_asuka.decode(z, image, mask[:1])                    # one mask for every image
    assert both.shape[0] == 2
    assert torch.allclose(both[1], tiny_asuka.decode(z[1:], image[1:], mask[:1])[0], atol=1e-5)
    one_image = tiny_asuka.decode(z, image[:1], mask[:1])           # one image for many latents
    assert torch.allclose(one_image[1], tiny_asuka.decode(z[1:], image[:1], mask[:1])[0], atol=1e-5)
    z3 = torch.cat([z, z[:1]])
    with pytest.raises(InputError, match="batch of 3 but there are 2 images"):
        tiny_asuka.decode(z3, image, mask)


def test_empty_mask_is_valid(tiny_asuka):
    z, image, _ = _inputs(0, batch=1, lh=4, lw=4, channels=16)
    out = tiny_asuka.decode(z, image, torch.zeros(1, 32, 32))
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------
# (6) Loading paths and wrong files


def test_equivalent_layouts_load_identically(tiny_asuka, tiny_asuka_sd, tmp_path):
    z, image, mask = _inputs(2, batch=1, lh=4, lw=6, channels=16)
    expected = tiny_asuka.decode(z, image, mask)
    bare = {k[len("decoder."):]: v for k, v in tiny_asuka_sd.items() if k.startswith("decoder.")}
    bare["encoder_up_layers.0.deconv.weight"] = torch.zeros(64, 64, 4, 4)   # the other unused name
    path = tmp_path / "asuka_decoder.safetensors"
    ckpt_mod.save_safetensors(tiny_asuka_sd, path)
    own = tmp_path / "own.safetensors"
    ckpt_mod.save_safetensors(tiny_asuka.state_dict(), own)
    for source in (bare, path, own, ckpt_mod.read_checkpoint(path)):
        assert torch.equal(load_decoder(source).decode(z, image, mask), expected)


@pytest.mark.parametrize("tensors, looks_like", [
    ({"patch_embed.proj.weight": torch.zeros(1), "decoder_embed.weight": torch.zeros(1),
      "pos_embed": torch.zeros(1)}, "MAE"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3),
      "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, "Stable Diffusion 1.x inpainting"),
    ({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3), "decoder.up.0.block.0.conv1.weight": torch.zeros(1),
      "encoder.conv_in.weight": torch.zeros(1)}, "plain VAE"),
])
def test_wrong_files_say_what_they_are(tensors, looks_like):
    with pytest.raises(CheckpointError, match=looks_like):
        load_decoder(tensors)


def test_avq_without_post_quant_conv_is_refused():
    sd = {k: v for k, v in avq_ldm_state_dict(seed=0, with_extras=False, **TINY).items()
          if not k.startswith("post_quant_conv.")}
    with pytest.raises(CheckpointError, match="post_quant_conv"):
        load_decoder(sd)


def test_truncated_decoder_is_refused(tiny_asuka_sd):
    sd = dict(tiny_asuka_sd)
    del sd["decoder.up.2.block.1.conv2.weight"]
    with pytest.raises(CheckpointError, match="missing up.2.block.1.conv2.weight"):
        load_decoder(sd)


def test_extra_decoder_weights_are_ignored_with_a_log_line(tiny_asuka, tiny_asuka_sd, tmp_path, caplog):
    """The released asuka_decoder.ckpt may hold decoder.* weights beyond the decoder's
    (the official demo loads it with strict=False): they are ignored and named in the log;
    the decoder is the same as without them."""
    sd = dict(tiny_asuka_sd)
    sd["decoder.refiner.conv.weight"] = torch.randn(8, 8, 3, 3)
    sd["decoder.up.1.attn.0.q.weight"] = torch.randn(64, 64, 1, 1)
    path = tmp_path / "asuka_decoder.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    with caplog.at_level("INFO", logger="comfyui-asuka"):
        decoder = load_decoder(str(path))
    assert set(decoder.ignored_keys) == {"refiner.conv.weight", "up.1.attn.0.q.weight"}
    assert "refiner.conv.weight" in caplog.text and "up.1.attn.0.q.weight" in caplog.text
    z, image, mask = _inputs(2, batch=1, lh=4, lw=4, channels=16)
    assert torch.equal(decoder.decode(z, image, mask), tiny_asuka.decode(z, image, mask))
    del sd["decoder.mid.attn_1.q.weight"]          # a missing weight is still refused
    with pytest.raises(CheckpointError, match=r"missing mid\.attn_1\.q\.weight"):
        load_decoder(sd)


class _PoisonOps:
    """Like comfy.ops.manual_cast: layers skip init (here: poison it) and cast weights to the
    input's dtype at run time. Proves every parameter is taken from the file."""

    class _Cast:
        def reset_parameters(self):
            with torch.no_grad():
                for p in self.parameters(recurse=False):
                    if p.device.type != "meta":
                        p.fill_(float("nan"))

        def forward(self, x):
            w = self.weight.to(x.dtype)
            b = None if self.bias is None else self.bias.to(x.dtype)
            return self._cast_forward(x, w, b)

    class Conv2d(_Cast, nn.Conv2d):
        def _cast_forward(self, x, w, b):
            return self._conv_forward(x, w, b)

    class Linear(_Cast, nn.Linear):
        def _cast_forward(self, x, w, b):
            return F.linear(x, w, b)

    class GroupNorm(_Cast, nn.GroupNorm):
        def _cast_forward(self, x, w, b):
            return F.group_norm(x, self.num_groups, w, b, self.eps)


def test_operations_and_manual_cast(tiny_asuka_sd):
    z, image, mask = _inputs(6, batch=1, lh=4, lw=4, channels=16)
    # bf16 storage, float32 compute == float32 weights rounded to bf16
    stored = load_decoder(tiny_asuka_sd, operations=_PoisonOps, dtype=torch.bfloat16)
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in stored.parameters())
    stored.compute_dtype = torch.float32
    rounded = {k: v.to(torch.bfloat16).float() for k, v in tiny_asuka_sd.items()}
    assert torch.allclose(stored.decode(z, image, mask), load_decoder(rounded).decode(z, image, mask), atol=1e-6)


def test_half_precision_close_to_float32(tiny_asuka, tiny_asuka_sd):
    z, image, mask = _inputs(9, batch=1, lh=8, lw=8, channels=16)
    half = load_decoder(tiny_asuka_sd, dtype=torch.bfloat16)
    assert half.decode(z, image, mask).dtype == torch.float32
    assert (half.decode(z, image, mask) - tiny_asuka.decode(z, image, mask)).abs().max() < 0.1


@pytest.mark.parametrize("kind", [KIND_ASUKA, KIND_AVQ])
def test_memory_estimate_covers_the_measured_peak(kind, tiny_asuka_sd):
    """The estimate ComfyUI frees memory by must cover the decode's real peak (measured
    op by op, tests/fixtures/tensor_memory.py), without asking for more than 2.5x it
    (more would unload other models for nothing)."""
    from tests.fixtures.tensor_memory import TensorMemory

    if kind == KIND_ASUKA:
        decoder, channels = load_decoder(tiny_asuka_sd), 16
    else:
        decoder, channels = load_decoder(avq_ldm_state_dict(seed=1, with_extras=False, **TINY)), 4
    z, image, mask = _inputs(2, batch=2, lh=16, lw=16, channels=channels)
    with TensorMemory() as memory:
        decoder.decode(z, image, mask)
    estimate = decode_memory_estimate(decoder, z.shape, torch.float32)
    print(f"{kind}: measured peak {memory.peak / 2**20:.1f} MiB, estimate {estimate / 2**20:.1f} MiB")
    assert memory.peak <= estimate <= 2.5 * memory.peak


def test_soft_masks_are_binarised_for_avq_as_diffusers_does(diffusers_vae):
    """AVQ decoders see the mask binarised as diffusers' inpainting pipeline binarises it
    (its own VaeImageProcessor(do_binarize=True), the oracle here) before
    AsymmetricAutoencoderKL.decode. (The ASUKA decoder's soft-mask rule is checked against
    the independent re-statement above, with soft masks.)"""
    from diffusers.image_processor import VaeImageProcessor

    avq = load_decoder(diffusers_vae.state_dict())
    z, image, mask = _inputs(3, batch=1, lh=8, lw=12, channels=4, soft=True)
    assert ((mask > 0) & (mask < 1)).any()
    binarised = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True).binarize(mask.clone())
    expected = ((_diffusers_decode(diffusers_vae, z, image, binarised) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert (avq.decode(z, image, mask) - expected).abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------
# Region decoding: only the boxes that can reach the hole


def _rect_mask(batch: int, lh: int, lw: int, rects_per_sample) -> torch.Tensor:
    """MASK [B, H, W] with the given pixel rectangles (y0, y1, x0, x1) per sample; the
    first rectangle of each sample gets a soft 3-pixel edge above it."""
    mask = torch.zeros(batch, lh * 8, lw * 8)
    for b, rects in enumerate(rects_per_sample):
        for y0, y1, x0, x1 in rects:
            mask[b, y0:y1, x0:x1] = 1.0
        y0, _, x0, x1 = rects[0]
        if y0 >= 3:
            mask[b, y0 - 3:y0, x0:x1] = 0.4
    return mask


@pytest.fixture(scope="module")
def local_asuka(tiny_asuka_sd):
    """The tiny ASUKA decoder with no global operation (see _LocalOps)."""
    sd = dict(tiny_asuka_sd)
    for name in ("weight", "bias"):
        sd[f"decoder.mid.attn_1.proj_out.{name}"] = torch.zeros_like(sd[f"decoder.mid.attn_1.proj_out.{name}"])
    return load_decoder(sd, operations=_LocalOps)


def _brute_grown(hole: torch.Tensor, reach: int) -> torch.Tensor:
    """Cells within ``reach`` (Chebyshev distance) of a hole cell, by explicit distances."""
    ys, xs = torch.nonzero(hole, as_tuple=True)
    gy, gx = torch.meshgrid(torch.arange(hole.shape[0]), torch.arange(hole.shape[1]), indexing="ij")
    if ys.numel() == 0:
        return torch.zeros_like(hole)
    d = torch.maximum((gy[..., None] - ys).abs(), (gx[..., None] - xs).abs()).min(-1).values
    return d <= reach


@pytest.mark.parametrize("seed", range(6))
def test_hole_regions_are_disjoint_boxes_holding_each_grown_hole_cell(seed):
    g = torch.Generator().manual_seed(seed)
    h, w, reach = 40, 56, 3 + seed % 3
    hole = torch.rand(h, w, generator=g) > 0.995          # scattered cells, some near the border
    hole[seed, 0] = True
    boxes = hole_regions(hole, reach)
    owner = torch.full((h, w), -1)
    for n, b in enumerate(boxes):
        assert b.height > 0 and b.width > 0 and b.y >= 0 and b.x >= 0 and b.y + b.height <= h and b.x + b.width <= w
        assert (owner[b.y:b.y + b.height, b.x:b.x + b.width] == -1).all()       # disjoint
        owner[b.y:b.y + b.height, b.x:b.x + b.width] = n
    grown = _brute_grown(hole, reach)
    assert (owner[grown] >= 0).all()                                              # covers the grown hole
    for y, x in torch.nonzero(hole).tolist():                                     # a square is never split
        square = owner[max(0, y - reach):y + reach + 1, max(0, x - reach):x + reach + 1]
        assert (square == square[0, 0]).all()
    assert region_share(boxes, h, w) == pytest.approx(float((owner >= 0).sum()) / (h * w))


def test_hole_regions_separate_far_holes_and_merge_near_ones():
    hole = torch.zeros(30, 60, dtype=torch.bool)
    hole[2:5, 3:6] = True
    hole[20:24, 40:50] = True
    assert hole_regions(hole, 4) == [Tile(0, 0, 9, 10), Tile(16, 36, 12, 18)]
    assert len(hole_regions(hole, 16)) == 2                 # rows overlap, columns do not
    assert len(hole_regions(hole, 17)) == 1                # grown squares meet: one box
    assert hole_regions(torch.zeros(8, 8, dtype=torch.bool), 3) == []


def test_region_decode_equals_the_full_decode_in_the_hole_without_global_ops(local_asuka):
    """Exactness, not a tolerance: with no global operation a hole pixel sees nothing
    beyond the decoder's reach, which the region includes."""
    lh = lw = 48
    z, image, _ = _inputs(1, batch=1, lh=lh, lw=lw, channels=16)
    mask = _rect_mask(1, lh, lw, [[(170, 205, 160, 230)]])
    boxes = local_asuka.decode_boxes(mask[0], lh, lw, "hole")
    assert len(boxes) == 1 and region_share(boxes, lh, lw) < 0.8
    full = local_asuka.decode(z, image, mask, region="full")
    calls = []
    region = local_asuka.decode(z, image, mask, region="hole", progress=lambda d, t: calls.append((d, t)))
    # one unit for the latent-resolution stages on the whole latent, one per up level of the box
    assert calls == [(n, local_asuka.stages) for n in range(1, local_asuka.stages + 1)]
    hole = mask > 0
    assert torch.allclose(region[hole], full[hole], atol=1e-5)
    b = boxes[0]
    inside = torch.zeros_like(hole)
    inside[:, b.y * 8:(b.y + b.height) * 8, b.x * 8:(b.x + b.width) * 8] = True
    assert torch.equal(region[~inside], image[~inside])                 # outside the box: the original
    assert not torch.allclose(region[inside & ~hole], full[inside & ~hole], atol=1e-3)  # box edges differ
    pasted, pasted_full = composite(image, region, mask), composite(image, full, mask)
    assert torch.equal(pasted[~hole], image[~hole]) and torch.equal(pasted_full[~hole], image[~hole])
    assert torch.allclose(pasted, pasted_full, atol=1e-5)


def test_region_decode_several_holes_on_the_border_and_a_batch_of_masks(local_asuka):
    lh, lw = 40, 96
    z, image, _ = _inputs(2, batch=2, lh=lh, lw=lw, channels=16)
    mask = _rect_mask(2, lh, lw, [
        [(0, 40, 0, 48), (280, 320, 700, 768)],               # two holes in opposite corners
        [(150, 190, 730, 768)],                                # one hole on the right edge
    ])
    assert len(local_asuka.decode_boxes(mask[0], lh, lw, "hole")) == 2
    assert len(local_asuka.decode_boxes(mask[1], lh, lw, "hole")) == 1
    full = local_asuka.decode(z, image, mask)
    calls = []
    region = local_asuka.decode(z, image, mask, region="auto", progress=lambda d, t: calls.append((d, t)))
    # per sample one unit for the latent-resolution stages, then one per up level of each box
    units = 2 + 3 * local_asuka.config.levels
    assert calls == [(n, units) for n in range(1, units + 1)]
    hole = mask > 0
    assert torch.allclose(region[hole], full[hole], atol=1e-5)
    assert torch.equal(composite(image, region, mask)[~hole], image[~hole])
    # one sample alone gives the same as in the batch
    alone = local_asuka.decode(z[1:], image[1:], mask[1:], region="hole")
    assert torch.allclose(alone, region[1:], atol=1e-6)


def test_region_decode_runs_the_mid_block_on_the_whole_latent(tiny_asuka_sd):
    """A decoder whose only global operation is the mid attention (per-pixel GroupNorm, see
    _LocalOps, attention left on): the region decode equals the full decode in the hole,
    because the mid block runs on the whole latent and its attention attends over the whole
    picture. The same up path fed a mid block run on the box alone differs there."""
    attending = load_decoder(tiny_asuka_sd, operations=_LocalOps)
    lh = lw = 48
    z, image, _ = _inputs(4, batch=1, lh=lh, lw=lw, channels=16)
    mask = _rect_mask(1, lh, lw, [[(170, 205, 160, 230)]])
    (b,) = attending.decode_boxes(mask[0], lh, lw, "hole")
    assert region_share([b], lh, lw) < 0.6
    full = attending.decode(z, image, mask, region="full")
    region = attending.decode(z, image, mask, region="hole")
    hole = mask > 0
    assert torch.allclose(region[hole], full[hole], atol=1e-5)
    # the attention matters: the box decoded alone (mid block on the box only) differs in the hole
    ys, xs = slice(b.y * 8, (b.y + b.height) * 8), slice(b.x * 8, (b.x + b.width) * 8)
    alone = attending.decode(z[..., b.y:b.y + b.height, b.x:b.x + b.width], image[:, ys, xs], mask[:, ys, xs])
    assert (alone[hole[:, ys, xs]] - full[:, ys, xs][hole[:, ys, xs]]).abs().max() > 1e-3


def test_region_boxes_use_the_up_path_reach(tiny_asuka):
    cfg = tiny_asuka.config
    assert cfg.reach_px - cfg.reach_up_px == 5 * cfg.scale      # conv_in + the mid block's 4 convs
    hole = torch.zeros(1, 48 * 8, 48 * 8)
    hole[:, 200:208, 200:208] = 1.0                              # one latent cell (25, 25)
    (box,) = tiny_asuka.decode_boxes(hole[0], 48, 48, "hole")
    r = cfg.reach_up_cells
    assert box == Tile(25 - r, 25 - r, 2 * r + 1, 2 * r + 1)


def test_region_modes_on_a_decoder_with_global_ops(tiny_asuka):
    lh = lw = 48
    z, image, _ = _inputs(3, batch=1, lh=lh, lw=lw, channels=16)
    big = _rect_mask(1, lh, lw, [[(40, 340, 40, 340)]])
    assert torch.equal(tiny_asuka.decode(z, image, big, region="auto"), tiny_asuka.decode(z, image, big))
    small = _rect_mask(1, lh, lw, [[(10, 40, 12, 50)]])
    assert region_share(tiny_asuka.decode_boxes(small[0], lh, lw, "auto"), lh, lw) <= 0.5
    auto, hole_only = (tiny_asuka.decode(z, image, small, region=r) for r in ("auto", "hole"))
    assert torch.equal(auto, hole_only)
    full = tiny_asuka.decode(z, image, small)
    hole = small > 0
    # the up blocks' GroupNorm statistics see only the region: close, not equal
    assert not torch.equal(auto[hole], full[hole])
    # tiles inside the region: shape and the original outside
    tiled = tiny_asuka.decode(z, image, small, region="hole", tile_size=8, tile_overlap=2)
    assert tiled.shape == full.shape and torch.equal(composite(image, tiled, small)[~hole], image[~hole])
    # no hole: nothing decoded, the original returned
    calls = []
    empty = torch.zeros(1, lh * 8, lw * 8)
    assert torch.equal(tiny_asuka.decode(z, image, empty, region="auto", progress=lambda d, t: calls.append((d, t))),
                       image)
    assert calls == [(1, 1)]
    with pytest.raises(InputError, match="region must be one of"):
        tiny_asuka.decode(z, image, small, region="box")
