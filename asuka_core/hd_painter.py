"""HD-Painter for SD1.5 inpainting UNets: PAIntA and RASG (arXiv 2312.14091): the maths.

Pure PyTorch; it knows nothing of ComfyUI (no import, no option keys). The public API,
each function tested alone and called by the node path:

* PAIntA: ``painta_factors`` (prompt relevance c), ``painta_rescale`` (scores * C),
  ``painta_hole_attention`` (the self-attention of the hole rows with rescaled scores),
  ``cross_logits`` (pre-softmax cross-attention scores of a block's ``attn2``).
* RASG: ``rasg_score``, ``rasg_noise_scale``, ``normalise_gradient``, ``rasg_update``,
  and ``sample_rasg``, the sampling loop written against two callables (a plain denoiser
  and one that also returns the gradient of the score), so that the loop is the same
  for any host.
* masks and prompts: ``mask_at_level``, ``prepare_pixel_mask``, ``dilate_cross``,
  ``prompt_token_positions``, ``count_word_tokens``, ``require_words``.

How these reach a UNet call (attention patches, the capture of cross-attention logits,
the sampler wrapper) is host glue, in ``nodes/hd_painter_glue.py``. Where the paper and
the official code differ, the official code is followed; the open choices are options
(see docs/hd-painter.md).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

# UNet levels (downscale factor = 2**level relative to the latent) PAIntA and RASG work on.
# SD1.5 at 512x512: level 1 = 32x32 tokens, level 2 = 16x16 tokens.
PAINTA_LEVELS = (1, 2)
RASG_LEVEL = 2
PAINTA_END_TIMESTEP = 500      # PAIntA is active while the timestep is > 500 (official code)
RASG_LOGIT_SHIFT = 1.0         # BCE is taken on (logits - 1.0) (official code)
SIGMA_MODES = ("official_code", "paper")

# Attend-and-Excite smoothing kernel as the official code builds it: sigma 0.5, but the
# exponent is -(d / (2 sigma))^2, so the 1-D weights are exp(-d^2) normalised.
_SMOOTH_SIGMA = 0.5


def _smoothing_kernel(dtype=torch.float32, device=None) -> torch.Tensor:
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    w = torch.exp(-((d / (2 * _SMOOTH_SIGMA)) ** 2))
    w = w / w.sum()
    return torch.outer(w, w).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------ the maths

def painta_factors(cross_probs: torch.Tensor, token_indices: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Prompt relevance c of every pixel of one attention map.

    cross_probs: ``[n, L]`` (or ``[..., n, L]``) cross-attention probabilities (softmax over
    the L tokens, mean over heads) of the conditional half; n = height * width.
    Returns c ``[n]`` (or ``[..., n]``) in [0, 1]: the probabilities summed over
    ``token_indices``, smoothed with the 3x3 Attend-and-Excite kernel (zero padding), then
    ``clip((s - median(s)) / max(s), 0, 1)`` over all pixels of the map.
    """
    if cross_probs.shape[-2] != height * width:
        raise InputError(f"painta_factors: {cross_probs.shape[-2]} pixels given for a {height}x{width} map.")
    idx = torch.as_tensor(list(token_indices), dtype=torch.long, device=cross_probs.device)
    s = cross_probs.to(_score_dtype(cross_probs.dtype)).index_select(-1, idx).sum(-1)           # [..., n]
    lead = s.shape[:-1]
    s = s.reshape(-1, 1, height, width)
    s = F.conv2d(s, _smoothing_kernel(s.dtype, s.device)[None, None], padding=1)
    s = s.reshape(*lead, height * width)
    median = s.median(dim=-1, keepdim=True).values                  # lower middle value, as torch.median
    top = s.amax(dim=-1, keepdim=True)
    c = (s - median) / top.clamp_min(torch.finfo(s.dtype).tiny)
    return c.clamp(0.0, 1.0)


def _hole_bool(hole: torch.Tensor) -> torch.Tensor:
    return hole > 0.5 if hole.dtype != torch.bool else hole


def painta_rescale(scores: torch.Tensor, c: torch.Tensor, hole: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """PAIntA's rescaled self-attention scores.

    scores: ``[..., m, n]`` pre-softmax self-attention scores of m query pixels against
    all n key pixels; c: ``[n]``; hole: ``[n]`` (bool, or float with > 0.5 meaning hole);
    rows: the indices ``[m]`` of the query pixels among the n (default: all of them,
    m = n). ``C[i, j] = c[j]`` when pixel i is in the hole and pixel j is known, else 1.
    Returns ``scores * C``.
    """
    h = _hole_bool(hole).to(scores.device)
    factor = torch.where(~h, c.to(scores.device, scores.dtype), torch.ones_like(c, dtype=scores.dtype,
                                                                               device=scores.device))  # [n] keys j
    query_hole = h if rows is None else h[rows.to(h.device)]
    C = torch.where(query_hole[:, None], factor[None, :],
                    torch.ones((), dtype=scores.dtype, device=scores.device))                # [m, n]
    return scores * C


def painta_hole_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                          hole: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PAIntA self-attention of one sample's hole pixels.

    q, k, v: ``[n, heads * d]`` projected queries, keys and values of the n pixels; c, hole:
    ``[n]``. Returns ``(rows, out)``: the hole pixel indices ``[m]`` and
    ``softmax(painta_rescale(q k^T / sqrt(d))) v`` of those rows, ``[m, heads * d]``
    (before the output projection); scores in at least fp32. ``None`` when no pixel or
    every pixel is in the hole (PAIntA then changes nothing: C is all ones).
    """
    h = _hole_bool(hole)
    rows = h.nonzero(as_tuple=True)[0]
    if rows.numel() == 0 or rows.numel() == h.numel():
        return None
    qh = _heads_split(q[rows][None], heads)[0]                          # [heads, m, d]
    kh = _heads_split(k[None], heads)[0]                                # [heads, n, d]
    vh = _heads_split(v[None], heads)[0]
    dtype = _score_dtype(qh.dtype)
    scores = qh.to(dtype) @ kh.to(dtype).transpose(-1, -2) * (qh.shape[-1] ** -0.5)   # [heads, m, n]
    probs = painta_rescale(scores, c, h, rows).softmax(-1).to(vh.dtype)
    return rows, (probs @ vh).transpose(0, 1).reshape(rows.numel(), -1)


def _heads_split(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2)        # [b, heads, n, d]


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention scores in at least fp32 (fp16/bf16 models), in fp64 for fp64 models."""
    return torch.promote_types(dtype, torch.float32)


def cross_logits(attn2, hidden: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-softmax cross-attention scores ``[b, heads, n, L]`` of a cross-attention module
    with ``to_q`` / ``to_k`` projections, at least fp32 (hidden = norm2(x))."""
    dtype = _score_dtype(hidden.dtype)
    q = _heads_split(attn2.to_q(hidden).to(dtype), heads)
    k = _heads_split(attn2.to_k(context.to(hidden.dtype)).to(dtype), heads)
    return q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)


def rasg_score(cross_logits: torch.Tensor, token_indices: Sequence[int], hole: torch.Tensor) -> torch.Tensor:
    """RASG objective S (to be increased): minus the sum over the tokens of the pixel-mean
    binary cross-entropy between sigmoid(logits - 1.0) and the hole mask.

    cross_logits: ``[n, L]`` pre-softmax cross-attention scores of the conditional half,
    averaged over layers and heads; hole: ``[n]``. Differentiable in ``cross_logits``.
    """
    idx = torch.as_tensor(list(token_indices), dtype=torch.long, device=cross_logits.device)
    logits = cross_logits.to(_score_dtype(cross_logits.dtype)).index_select(-1, idx) - RASG_LOGIT_SHIFT      # [n, T]
    target = _hole_bool(hole).to(logits.device, logits.dtype)[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0)   # [T]
    return -bce.sum()


def rasg_noise_scale(sigma: float, sigma_next: float, eta: float, mode: str, sigma_table: torch.Tensor) -> float:
    """Scale u of the guidance term in ComfyUI (VE) units for one step sigma -> sigma_next.

    The DDIM update with stochasticity s (VP units) is, in ComfyUI units,
    ``x_next = D + sqrt(sigma_next^2 - u^2) eps + u xi`` with ``u = s sqrt(1 + sigma_next^2)``.

    mode "paper": s = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab') with ab the cumulative
    alpha products (the DDIM sigma of paper Eq. 3).
    mode "official_code": the same formula evaluated with the per-step alphas
    a_t = ab_t / ab_{t-1} (what the official code's schedule does), at the integer timesteps
    nearest to sigma and sigma_next in ``sigma_table`` (ComfyUI's ``model_sampling.sigmas``).
    """
    if mode not in SIGMA_MODES:
        raise InputError(f"Unknown RASG sigma mode '{mode}': use one of {', '.join(SIGMA_MODES)}.")
    if sigma_next <= 0:
        return 0.0
    if mode == "paper":
        ab, ab_next = 1.0 / (1.0 + sigma ** 2), 1.0 / (1.0 + sigma_next ** 2)
        s = eta * math.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
    else:
        table = sigma_table.double().cpu()
        logs = table.log()
        t = int((logs - math.log(sigma)).abs().argmin())
        t_next = int((logs - math.log(sigma_next)).abs().argmin())
        ab = 1.0 / (1.0 + table ** 2)
        ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        alpha = ab / ab_prev                                         # per-step alphas, 1 - beta
        a, a_next = float(alpha[t]), float(alpha[t_next])
        if t == t_next or a >= 1.0:
            return 0.0
        s = eta * math.sqrt(max((1 - a_next) / (1 - a) * (1 - a / a_next), 0.0))
    return s * math.sqrt(1.0 + sigma_next ** 2)


def normalise_gradient(grad: torch.Tensor) -> torch.Tensor:
    """grad / std(grad) per sample (unbiased std over C, H, W; no mean subtraction, as the
    official code). A zero gradient stays zero."""
    flat = grad.reshape(grad.shape[0], -1).to(_score_dtype(grad.dtype))
    std = flat.std(dim=1, unbiased=True) if flat.shape[1] > 1 else torch.ones(flat.shape[0], device=grad.device)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (flat / std[:, None]).reshape(grad.shape).to(grad.dtype)


def rasg_update(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, u: float,
                guidance: torch.Tensor) -> torch.Tensor:
    """One RASG/DDIM step in ComfyUI units: ``D + sqrt(sigma_next^2 - u^2) eps + u g``, with
    ``eps = (x - D) / sigma`` and g the normalised gradient (``normalise_gradient``)."""
    eps = (x - denoised) / sigma
    u = min(u, sigma_next)
    return denoised + math.sqrt(max(sigma_next ** 2 - u ** 2, 0.0)) * eps + u * guidance


def dilate_cross(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Binary dilation with the 3x3 cross (scipy's default structuring element). mask [B, H, W] bool."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=mask.device)
    m = mask.float()[:, None]
    for _ in range(iterations):
        m = (F.conv2d(m, kernel[None, None], padding=1) > 0).float()
    return m[:, 0] > 0


def mask_at_level(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A mask ``[B, H, W]`` (pixel or latent size, values in [0, 1]) at an attention map of
    height x width: antialiased bicubic resize (like PIL's bicubic), then > 0.5.
    Returns ``[B, height * width]`` bool (True = hole)."""
    m = mask.float()[:, None]
    if m.shape[-2:] != (height, width):
        down = m.shape[-2] > height or m.shape[-1] > width
        m = F.interpolate(m, size=(height, width), mode="bicubic", align_corners=False, antialias=down)
    return (m[:, 0] > 0.5).reshape(m.shape[0], height * width)


def prepare_pixel_mask(mask: torch.Tensor) -> torch.Tensor:
    """A user MASK ``[B, H, W]`` or ``[H, W]`` -> the binary hole PAIntA/RASG use: > 0.5, then
    the official 1-pixel cross dilation. Refuses an empty mask."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise InputError(f"HD-Painter needs a MASK of shape [batch, height, width]; got {tuple(mask.shape)}.")
    hole = dilate_cross(mask > 0.5)
    check_hole(hole.float(), "the MASK input")
    return hole.float()


def check_hole(mask: torch.Tensor, source: str) -> None:
    """Refuse a mask without any hole pixel (> 0.5) in some sample: nothing to inpaint.
    (A full mask is allowed: PAIntA then has no known pixel to act on; RASG still works.)"""
    per = mask.reshape(mask.shape[0], -1) > 0.5
    if not bool(per.any(dim=1).all()):
        raise InputError(f"HD-Painter: {source} has no hole (every pixel is known). Paint the area to fill "
                         "in the mask (white = inpaint) and connect it to InpaintModelConditioning or to "
                         "the node's mask input.")


def prompt_token_positions(full_chunks: Sequence[Sequence], n_prompt_tokens: int, *, start_token: int,
                           end_token: int, pad_token: int | None = None, chunk_length: int | None = None) -> list[int]:
    """Positions (in the concatenated text context) of the prompt's word tokens plus the
    end-of-text token of the full prompt.

    full_chunks: the token ids of the full prompt (prompt + suffix) as the tokenizer chunks
    them (each chunk starts with ``start_token``, ends with ``end_token`` and padding;
    entries that are not ints, e.g. embedding vectors, count as word tokens).
    n_prompt_tokens: how many word tokens the prompt alone has (the suffix's words are not
    counted, its end token is: official code).
    """
    if n_prompt_tokens <= 0:
        raise InputError("HD-Painter needs a prompt with at least one word: the prompt text is empty or has "
                         "only punctuation/weights syntax. Describe what should appear in the hole.")
    special = {start_token, end_token} | ({pad_token} if pad_token is not None else set())
    words: list[int] = []
    eot = None
    offset = 0
    for chunk in full_chunks:
        length = chunk_length or len(chunk)
        for j, tok in enumerate(chunk):
            is_int = isinstance(tok, int)
            if not is_int or tok not in special:
                words.append(offset + j)
                eot = None
            elif tok == end_token and eot is None and words:
                eot = offset + j
        offset += length
    if len(words) < n_prompt_tokens:
        raise InputError(f"HD-Painter: the full prompt has {len(words)} word tokens but the prompt alone has "
                         f"{n_prompt_tokens}; the positive suffix must not change how the prompt is tokenized.")
    if eot is None:
        raise InputError("HD-Painter: no end-of-text token after the prompt; the tokenizer output is not CLIP's.")
    return words[:n_prompt_tokens] + [eot]


def require_words(text: str) -> None:
    """Refuse a prompt without any letter or digit (empty, blank, only punctuation): PAIntA
    and RASG need words to relate to the image."""
    if not any(ch.isalnum() for ch in text):
        raise InputError("HD-Painter needs a prompt with at least one word: the prompt text is empty or has "
                         "only punctuation/weights syntax. Describe what should appear in the hole.")


def count_word_tokens(chunks: Sequence[Sequence], *, start_token: int, end_token: int,
                      pad_token: int | None = None) -> int:
    special = {start_token, end_token} | ({pad_token} if pad_token is not None else set())
    return sum(1 for chunk in chunks for tok in chunk if not isinstance(tok, int) or tok not in special)


# ------------------------------------------------------------------------------ sampler

def sample_rasg(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                guided: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.1, sigma_mode: str = "official_code",
                sigma_table: torch.Tensor, callback: Callable[[dict], None] | None = None,
                check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """RASG sampling: DDIM with the Gaussian noise replaced by the normalised gradient of
    the RASG score (ComfyUI / k-diffusion units: ``x = x0 + sigma eps``).

    denoise(x, sigma) -> the denoised prediction D (no gradient); guided(x, sigma) ->
    (D, grad_x S), S the RASG score of that same pass. sigma is a ``[batch]`` tensor.
    Each step: ``x_next = D + sqrt(sigma_next^2 - u^2) eps + u grad/std(grad)`` with u from
    ``rasg_noise_scale``. A step to sigma 0, or eta 0, needs no gradient: the last step
    returns D, eta 0 is deterministic DDIM.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        if check_interrupt is not None:
            check_interrupt()
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma_next <= 0 or eta == 0:
            denoised = denoise(x, sigmas[i] * s_in)
            x_next = denoised if sigma_next <= 0 else denoised + sigma_next * (x - denoised) / sigma
        else:
            denoised, grad = guided(x, sigmas[i] * s_in)
            u = rasg_noise_scale(sigma, sigma_next, eta, sigma_mode, sigma_table)
            x_next = rasg_update(x, denoised, sigma, sigma_next, u, normalise_gradient(grad))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x_next
    return x
