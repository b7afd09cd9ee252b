"""HD-Painter maths (asuka_core.hd_painter) against independent re-derivations.

Oracles: explicit loops / numpy written here from the formulas of the paper and the
official code (shared reference, Part A), the official beta schedule for the RASG sigma,
PIL's bicubic resize for the per-level masks and scipy's binary dilation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from asuka_core import hd_painter as hp
from asuka_core.errors import InputError


def _official_sigmas() -> tuple[np.ndarray, np.ndarray]:
    """SD's training schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (float64)."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    ab = np.cumprod(1.0 - betas)
    return betas, np.sqrt((1 - ab) / ab)


# ---------------------------------------------------------------------------- PAIntA factors

def _factors_by_loops(probs: np.ndarray, tokens, h: int, w: int) -> np.ndarray:
    s = probs[:, tokens].sum(1).reshape(h, w)
    one_d = np.array([0.2119, 0.5761, 0.2119])          # the reference's published weights
    k = np.outer(one_d, one_d)
    sm = np.zeros_like(s)
    for i in range(h):
        for j in range(w):
            acc = 0.0
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < h and 0 <= b < w:
                        acc += k[di + 1, dj + 1] * s[a, b]
            sm[i, j] = acc
    flat = sm.ravel()
    median = np.sort(flat)[(flat.size - 1) // 2]          # lower middle value
    return np.clip((flat - median) / flat.max(), 0, 1)


def test_smoothing_kernel_has_the_attend_and_excite_values():
    k = hp._smoothing_kernel().numpy()
    assert k[1, 1] == pytest.approx(0.3319, abs=1e-4)
    assert k[0, 1] == pytest.approx(0.1221, abs=1e-4) and k[1, 0] == pytest.approx(0.1221, abs=1e-4)
    assert k[0, 0] == pytest.approx(0.0449, abs=1e-4)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("h,w", [(6, 6), (5, 7), (4, 4)])
def test_painta_factors_match_loops(h, w):
    g = torch.Generator().manual_seed(h * 10 + w)
    probs = torch.randn(h * w, 77, generator=g).softmax(-1)
    tokens = [1, 2, 3, 9]
    got = hp.painta_factors(probs, tokens, h, w).numpy()
    want = _factors_by_loops(probs.double().numpy(), tokens, h, w)
    np.testing.assert_allclose(got, want, atol=2e-3)     # the published weights have 4 digits
    assert got.shape == (h * w,) and (got >= 0).all() and (got <= 1).all()
    # at least half the pixels are at or below the median -> zero
    assert (got == 0).sum() >= (h * w) // 2


def test_painta_factors_batched_equals_single():
    probs = torch.rand(3, 16, 10).softmax(-1)
    batched = hp.painta_factors(probs, [0, 4], 4, 4)
    for b in range(3):
        torch.testing.assert_close(batched[b], hp.painta_factors(probs[b], [0, 4], 4, 4))


# ---------------------------------------------------------------------------- PAIntA rescale

@pytest.mark.parametrize("float_mask", [False, True])
def test_painta_rescale_matches_loops_and_official_matrix_form(float_mask):
    n = 12
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 8, n, n, generator=g)
    c = torch.rand(n, generator=g)
    hole_b = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    hole = torch.where(hole_b, 0.9, 0.2) if float_mask else hole_b
    got = hp.painta_rescale(scores, c, hole)
    C = torch.ones(n, n)
    for i in range(n):
        for j in range(n):
            if hole_b[i] and not hole_b[j]:
                C[i, j] = c[j]
    torch.testing.assert_close(got, scores * C)
    # official code form: M = m m^T + (1 - m) over rows; C = (1 - M) c + M
    m = hole_b.float()
    M = m[:, None] * m[None, :] + (1 - m)[:, None]
    torch.testing.assert_close(got, scores * ((1 - M) * c[None, :] + M))
    # known rows are untouched
    torch.testing.assert_close(got[..., ~hole_b, :], scores[..., ~hole_b, :])


def test_painta_rescale_of_some_query_rows_is_those_rows_of_the_full_matrix():
    n = 10
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(4, n, n, generator=g, dtype=torch.float64)
    c = torch.rand(n, generator=g, dtype=torch.float64)
    hole = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    full = hp.painta_rescale(scores, c, hole)
    for rows in (hole.nonzero()[:, 0], torch.tensor([2, 0, 9, 4])):
        torch.testing.assert_close(hp.painta_rescale(scores[:, rows], c, hole, rows), full[:, rows], rtol=0, atol=0)


def test_painta_hole_attention_is_the_hole_rows_of_full_painta_attention():
    """Oracle: softmax(A * C) V with the full n x n C, written out per head."""
    n, heads, d = 12, 2, 3
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(n, heads * d, generator=g, dtype=torch.float64) for _ in range(3))
    c = torch.rand(n, generator=g, dtype=torch.float64)
    hole = torch.zeros(n, dtype=torch.bool)
    hole[[1, 2, 7]] = True
    C = torch.ones(n, n, dtype=torch.float64)
    C[hole[:, None] & ~hole[None, :]] = c.expand(n, n)[hole[:, None] & ~hole[None, :]]
    want = []
    for hd in range(heads):
        qh, kh, vh = (t[:, hd * d:(hd + 1) * d] for t in (q, k, v))
        want.append(((qh @ kh.T / math.sqrt(d)) * C).softmax(-1) @ vh)
    want = torch.cat(want, dim=1)
    rows, out = hp.painta_hole_attention(q, k, v, c, hole, heads)
    assert rows.tolist() == [1, 2, 7]
    torch.testing.assert_close(out, want[rows], rtol=1e-12, atol=1e-12)
    assert hp.painta_hole_attention(q, k, v, c, torch.zeros(n, dtype=torch.bool), heads) is None
    assert hp.painta_hole_attention(q, k, v, c, torch.ones(n, dtype=torch.bool), heads) is None


def test_sample_rasg_loop_with_a_known_denoiser():
    """The loop against the steps written out: D = 0.5 x, gradient = x."""
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.0], dtype=torch.float64)
    table = torch.from_numpy(_official_sigmas()[1])
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    got = hp.sample_rasg(lambda x, s: 0.5 * x, lambda x, s: (0.5 * x, x), x0.clone(), sigmas, eta=0.1,
                         sigma_table=table, callback=lambda d: seen.append(d["i"]))
    x = x0.clone()
    for i in range(2):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        u = hp.rasg_noise_scale(s, sn, 0.1, "official_code", table)
        x = hp.rasg_update(x, 0.5 * x, s, sn, u, hp.normalise_gradient(x))
    torch.testing.assert_close(got, 0.5 * x, rtol=0, atol=0)
    assert seen == [0, 1, 2]


# ---------------------------------------------------------------------------- RASG score

def test_rasg_score_matches_numpy_bce_and_is_differentiable():
    n, L = 16, 77
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(n, L, generator=g, dtype=torch.float64) * 3
    hole = torch.zeros(n, dtype=torch.bool)
    hole[3:9] = True
    tokens = [1, 2, 5]
    a = logits.numpy()[:, tokens] - 1.0
    y = hole.numpy().astype(np.float64)[:, None]
    sig = 1 / (1 + np.exp(-a))
    bce = -(y * np.log(sig) + (1 - y) * np.log(1 - sig))
    want = -bce.mean(0).sum()
    got = hp.rasg_score(logits, tokens, hole)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # gradient: d(-BCE)/da = y - sigmoid(a), divided by n (pixel mean)
    x = logits.clone().requires_grad_(True)
    hp.rasg_score(x, tokens, hole.float()).backward()
    expected = np.zeros((n, L))
    expected[:, tokens] = (y - sig) / n
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_rasg_score_is_highest_when_attention_follows_the_hole():
    hole = torch.zeros(16, dtype=torch.bool)
    hole[:8] = True
    follows = torch.where(hole[:, None], 8.0, -8.0).expand(16, 4)
    opposite = -follows
    assert hp.rasg_score(follows, [1, 2], hole) > hp.rasg_score(opposite, [1, 2], hole)


# ---------------------------------------------------------------------------- RASG sigma

@pytest.mark.parametrize("t,t_prev,code_scale", [
    (999, 979, 0.00185), (799, 779, 0.00170), (599, 579, 0.00154),
    (399, 379, 0.00136), (199, 179, 0.00115), (39, 19, 0.00096)])
def test_official_code_sigma_matches_per_step_alpha_formula(t, t_prev, code_scale):
    betas, sigmas = _official_sigmas()
    alphas = 1.0 - betas                     # official `_alphas` (per step)
    eta = 0.1
    s = eta * math.sqrt((1 - alphas[t_prev]) / (1 - alphas[t]) * (1 - alphas[t] / alphas[t_prev]))
    assert s == pytest.approx(code_scale, abs=1e-5)      # the reference's table (5 digits)
    table = torch.tensor(sigmas, dtype=torch.float32)
    u = hp.rasg_noise_scale(float(sigmas[t]), float(sigmas[t_prev]), eta, "official_code", table)
    assert u / math.sqrt(1 + sigmas[t_prev] ** 2) == pytest.approx(s, rel=2e-3)


@pytest.mark.parametrize("t,t_prev", [(999, 979), (519, 499), (39, 19)])
def test_paper_sigma_is_ddim_sigma_and_ancestral_sigma_up(t, t_prev):
    _, sigmas = _official_sigmas()
    ab = 1 / (1 + sigmas ** 2)
    eta = 0.7
    s_vp = eta * math.sqrt((1 - ab[t_prev]) / (1 - ab[t])) * math.sqrt(1 - ab[t] / ab[t_prev])
    u = hp.rasg_noise_scale(float(sigmas[t]), float(sigmas[t_prev]), eta, "paper", torch.tensor(sigmas))
    assert u == pytest.approx(s_vp / math.sqrt(ab[t_prev]), rel=1e-6)
    # k-diffusion's sigma_up of an ancestral step, written out here
    s, sn = sigmas[t], sigmas[t_prev]
    assert u == pytest.approx(eta * math.sqrt(sn ** 2 * (s ** 2 - sn ** 2) / s ** 2), rel=1e-6)
    if t == 999:
        assert s_vp / eta == pytest.approx(0.4600, abs=1e-4)


def test_last_step_and_bad_mode():
    assert hp.rasg_noise_scale(0.5, 0.0, 0.1, "paper", torch.ones(3)) == 0.0
    with pytest.raises(InputError, match="official_code"):
        hp.rasg_noise_scale(1.0, 0.5, 0.1, "diffusers", torch.ones(3))


def test_rasg_update_is_the_vp_ddim_step_in_comfy_units():
    _, sigmas = _official_sigmas()
    t, tp = 599, 579
    s, sn = float(sigmas[t]), float(sigmas[tp])
    ab, abp = 1 / (1 + s ** 2), 1 / (1 + sn ** 2)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    xi = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    s_vp = 0.3
    z_next = math.sqrt(abp) * x0 + math.sqrt(1 - abp - s_vp ** 2) * eps + s_vp * xi     # VP (official)
    x = x0 + s * eps                                                                      # ComfyUI x at sigma
    got = hp.rasg_update(x, x0, s, sn, s_vp * math.sqrt(1 + sn ** 2), xi)
    torch.testing.assert_close(got, z_next / math.sqrt(abp))


def test_normalise_gradient_divides_by_unbiased_std_per_sample():
    g = torch.randn(2, 4, 5, 5) * torch.tensor([3.0, 0.01])[:, None, None, None] + 0.7
    out = hp.normalise_gradient(g)
    for b in range(2):
        arr = g[b].numpy().astype(np.float64)
        np.testing.assert_allclose(out[b].numpy(), arr / arr.std(ddof=1), rtol=1e-5)
    assert torch.equal(hp.normalise_gradient(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------------------- masks

def test_mask_at_level_matches_pil_bicubic_threshold():
    rng = np.random.default_rng(0)
    m = np.zeros((512, 384), np.float32)
    m[100:300, 50:200] = 1
    m[400:430, 300:330] = 1
    m[rng.random(m.shape) < 0.01] = 1
    for h, w in [(32, 24), (16, 12)]:
        pil = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32) / 255
        want = (pil > 0.5).ravel()
        got = hp.mask_at_level(torch.from_numpy(m)[None], h, w)[0].numpy()
        assert (got != want).mean() <= 0.01, f"{(got != want).sum()} of {got.size} differ at {h}x{w}"


def test_dilate_cross_matches_scipy():
    rng = np.random.default_rng(1)
    m = rng.random((2, 20, 17)) < 0.05
    got = hp.dilate_cross(torch.from_numpy(m)).numpy()
    want = np.stack([ndimage.binary_dilation(x) for x in m])
    np.testing.assert_array_equal(got, want)


def test_prepare_pixel_mask_refuses_empty_masks_only():
    with pytest.raises(InputError, match="no hole"):
        hp.prepare_pixel_mask(torch.zeros(1, 16, 16))
    with pytest.raises(InputError, match="no hole"):            # one sample of the batch is empty
        hp.prepare_pixel_mask(torch.stack([torch.ones(16, 16), torch.zeros(16, 16)]))
    assert bool(hp.prepare_pixel_mask(torch.ones(16, 16)).all())
    m = torch.zeros(16, 16)
    m[5, 5] = 1
    assert int(hp.prepare_pixel_mask(m).sum()) == 5        # the 1-px cross


# ---------------------------------------------------------------------------- tokens

SOT, EOT = 49406, 49407


def _chunks(words: list, length: int = 77, per_chunk: int = 75) -> list[list]:
    out = []
    for i in range(0, max(len(words), 1), per_chunk):
        part = words[i:i + per_chunk]
        out.append([SOT] + part + [EOT] * (length - 1 - len(part)))
    return out


def test_token_positions_words_plus_eot_of_the_full_prompt():
    prompt = [320, 1929, 2368]                      # 3 word tokens
    suffix = [267, 1123, 6723]                      # ", high quality"
    chunks = _chunks(prompt + suffix)
    assert hp.prompt_token_positions(chunks, 3, start_token=SOT, end_token=EOT) == [1, 2, 3, 7]


def test_token_positions_long_prompt_spans_chunks_and_embeddings_count():
    words = list(range(1000, 1080))                  # 80 tokens -> 2 chunks of 77
    words[10] = torch.zeros(768)                     # a textual-inversion vector
    chunks = _chunks(words)
    pos = hp.prompt_token_positions(chunks, 80, start_token=SOT, end_token=EOT)
    assert pos[:75] == list(range(1, 76))
    assert pos[75:80] == list(range(78, 83))         # second chunk, after its start token
    assert pos[80] == 83                             # the end token of the full prompt


def test_token_positions_refuse_a_prompt_without_words():
    with pytest.raises(InputError, match="at least one word"):
        hp.prompt_token_positions(_chunks([]), 0, start_token=SOT, end_token=EOT)
    assert hp.count_word_tokens(_chunks([]), start_token=SOT, end_token=EOT) == 0
    for text in ("", "   ", " , ,  ", "(( ))"):
        with pytest.raises(InputError, match="at least one word"):
            hp.require_words(text)
    hp.require_words("a red car")
    hp.require_words("2")
