"""asuka_core.flux: the official ASUKA-FLUX conditioning recipe (reference §3.4) re-derived
here by hand, its ComfyUI format (reference part A §1.2-1.3), and the errors."""

from __future__ import annotations

import pytest
import torch

from asuka_core.aligner import TARGET_FLUX_CLIP, TARGET_FLUX_T5, TARGET_SD15, Aligner
from asuka_core.errors import CheckpointError, InputError
from asuka_core.flux import (
    DEFAULT_GUIDANCE,
    DEFAULT_WEIGHT,
    blend_toward_empty,
    flux_conditioning,
    pooled_from_tokens,
)
from tests.fixtures.aligner_files import official_aligner_state_dict, without_modulation


def _aligner(width, target, seed, depth=1):
    model = Aligner(width, depth, target)
    model.load_state_dict(without_modulation(official_aligner_state_dict(seed, width, depth)), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def aligners():
    # The real widths (768 and 4096; the target is read from the width), one block each.
    return _aligner(768, TARGET_FLUX_CLIP, 1), _aligner(4096, TARGET_FLUX_T5, 2)


def _features(batch=2, seed=3):
    return torch.randn(batch, 256, 512, generator=torch.Generator().manual_seed(seed))


def _empty(seed=4, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 256, 4096, generator=g), torch.randn(batch, 768, generator=g)


def test_defaults_are_the_official_values():
    assert DEFAULT_WEIGHT == 0.5 and DEFAULT_GUIDANCE == 30.0


def test_official_recipe_by_hand(aligners):
    clip, t5 = aligners
    f = _features()
    e_txt, e_vec = _empty()
    out = flux_conditioning(f, clip, t5, weight=0.5, guidance=30.0, empty_txt=e_txt, empty_pooled=e_vec)
    with torch.no_grad():
        txt_mae = t5(f)
        vec_mae = clip(f).sum(dim=1) / 256.0
    # official: vec = vec_empty + w (vec_mae - vec_empty); txt likewise; w = 0.5 -> the midpoint
    torch.testing.assert_close(out.txt, (txt_mae + e_txt) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, (vec_mae + e_vec) / 2, rtol=1e-5, atol=1e-5)
    assert out.txt.shape == (2, 256, 4096) and out.pooled.shape == (2, 768)
    assert out.txt.dtype == out.pooled.dtype == torch.float32
    assert out.guidance == 30.0


def test_weight_one_is_the_pure_prior_without_empty(aligners):
    clip, t5 = aligners
    f = _features(batch=1)
    out = flux_conditioning(f, clip, t5, weight=1.0)
    with torch.no_grad():
        assert torch.equal(out.txt, t5(f))
        assert torch.equal(out.pooled, clip(f).mean(dim=1))


def test_per_image_conditioning_in_a_batch(aligners):
    """Each image of a batch gets its own tokens: the batch result equals the single runs."""
    clip, t5 = aligners
    f = _features(batch=3, seed=9)
    e_txt, e_vec = _empty()
    both = flux_conditioning(f, clip, t5, empty_txt=e_txt, empty_pooled=e_vec)
    for i in range(3):
        one = flux_conditioning(f[i:i + 1], clip, t5, empty_txt=e_txt, empty_pooled=e_vec)
        torch.testing.assert_close(both.txt[i:i + 1], one.txt, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(both.pooled[i:i + 1], one.pooled, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both.txt[0], both.txt[1])


def test_blend_endpoints_and_batch_empty():
    g = torch.Generator().manual_seed(0)
    txt, vec = torch.randn(2, 256, 4096, generator=g), torch.randn(2, 768, generator=g)
    e_txt, e_vec = _empty(batch=2)
    t0, v0 = blend_toward_empty(txt, vec, 0.0, e_txt, e_vec)
    assert torch.equal(t0, e_txt) and torch.equal(v0, e_vec)
    t1, v1 = blend_toward_empty(txt, vec, 1.0, e_txt, e_vec)
    assert torch.equal(t1, txt) and torch.equal(v1, vec)
    t, v = blend_toward_empty(txt, vec, 0.25, e_txt, e_vec)
    torch.testing.assert_close(t, 0.75 * e_txt + 0.25 * txt)
    torch.testing.assert_close(v, 0.75 * e_vec + 0.25 * vec)


def test_comfy_format_is_one_entry_of_batch_b(aligners):
    clip, t5 = aligners
    e_txt, e_vec = _empty()
    cond = flux_conditioning(_features(batch=2), clip, t5, empty_txt=e_txt, empty_pooled=e_vec,
                             guidance=12.5).comfy()
    assert len(cond) == 1
    tensor, extra = cond[0]
    assert tensor.shape == (2, 256, 4096)
    assert set(extra) == {"pooled_output", "guidance"}
    assert extra["pooled_output"].shape == (2, 768) and extra["guidance"] == 12.5


def test_pooled_is_the_token_mean():
    tokens = torch.arange(2 * 256 * 768, dtype=torch.float32).view(2, 256, 768)
    expected = torch.stack([tokens[b].sum(0) / 256 for b in range(2)])
    torch.testing.assert_close(pooled_from_tokens(tokens), expected)


def test_activate_is_called_on_each_slot_before_use(aligners):
    clip, t5 = aligners

    class Holder:
        def __init__(self, model):
            self.model = model

    seen = []

    def activate(holder):
        seen.append(holder.model.target)
        return holder.model

    flux_conditioning(_features(batch=1), Holder(clip), Holder(t5), weight=1.0, activate=activate)
    assert seen == [TARGET_FLUX_CLIP, TARGET_FLUX_T5]


# ------------------------------------------------------------------------------ errors


def test_weight_below_one_without_empty_is_refused(aligners):
    clip, t5 = aligners
    with pytest.raises(InputError, match="no 'empty' conditioning is connected.*weight to 1.0"):
        flux_conditioning(_features(batch=1), clip, t5, weight=0.5)


def test_wrong_aligner_in_a_slot(aligners):
    clip, t5 = aligners
    f = _features(batch=1)
    with pytest.raises(CheckpointError, match="swapped"):
        flux_conditioning(f, t5, clip, weight=1.0)
    with pytest.raises(CheckpointError, match=r"'t5_aligner'.*T5 token sequence.*pooled CLIP"):
        flux_conditioning(f, clip, clip, weight=1.0)
    sd15 = _aligner(768, TARGET_SD15, 5)
    with pytest.raises(CheckpointError, match=r"'clip_aligner'.*Stable Diffusion 1.5"):
        flux_conditioning(f, sd15, t5, weight=1.0)
    with pytest.raises(CheckpointError, match="expected an ASUKA aligner"):
        flux_conditioning(f, object(), t5, weight=1.0)


@pytest.mark.parametrize("case, match", [
    ("sd15_text", "SD1.5 or SDXL"),          # [1,77,768] from an SD1.5 CLIP Text Encode
    ("long_prompt", "exactly 256"),          # [1,301,4096]: T5 of a long prompt
    ("no_pooled", "no pooled_output"),
    ("bad_pooled", r"pooled_output \[1, 1280\]"),
    ("batch", "batch 3"),
    ("nan", "NaN"),
])
def test_bad_empty_is_refused(aligners, case, match):
    clip, t5 = aligners
    e_txt, e_vec = _empty()
    e_txt, e_vec = {
        "sd15_text": (torch.zeros(1, 77, 768), e_vec),
        "long_prompt": (torch.zeros(1, 301, 4096), e_vec),
        "no_pooled": (e_txt, None),
        "bad_pooled": (e_txt, torch.zeros(1, 1280)),
        "batch": (torch.zeros(3, 256, 4096), torch.zeros(3, 768)),
        "nan": (e_txt.clone().index_fill_(1, torch.tensor([5]), float("nan")), e_vec),
    }[case]
    with pytest.raises(InputError, match=match):
        flux_conditioning(_features(batch=2), clip, t5, empty_txt=e_txt, empty_pooled=e_vec)


@pytest.mark.parametrize("kw", [{"weight": float("nan")}, {"weight": "x"}, {"guidance": -1.0},
                                {"guidance": float("inf")}])
def test_bad_numbers(aligners, kw):
    clip, t5 = aligners
    with pytest.raises(InputError):
        flux_conditioning(_features(batch=1), clip, t5, **{"weight": 1.0, **kw})


def test_bad_features(aligners):
    clip, t5 = aligners
    with pytest.raises(InputError, match="MAE features"):
        flux_conditioning(torch.zeros(1, 77, 512), clip, t5, weight=1.0)
