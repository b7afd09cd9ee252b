"""HD-Painter for SD1.5 inpainting UNets: PAIntA and RASG (arXiv 2312.14091).

Pure PyTorch, no ComfyUI import. Three layers:

1. The maths, testable alone (the public API):
   ``painta_factors``, ``painta_rescale``, ``rasg_score``, ``rasg_noise_scale``,
   ``rasg_update``, ``mask_at_level``, ``prompt_token_positions``.
2. Hooks that plug that maths into a ComfyUI-style UNet call without importing ComfyUI:
   ``PaintaPatch`` (attn1 / attn1-output / middle patches + a diffusion-model wrapper) and
   ``RasgCapture`` (an attn2 patch that records pre-softmax cross-attention logits). They read
   the ComfyUI ``transformer_options`` keys (``cond_or_uncond``, ``block``, ``block_index``,
   ``original_shape``, ``activations_shape``) as plain dict entries and reach the UNet's
   transformer blocks by duck typing (``input_blocks`` / ``middle_block`` / ``output_blocks``,
   ``transformer_blocks``, ``norm1/norm2``, ``attn1/attn2.to_q/to_k/to_v/to_out``).
3. ``sample_rasg``: the RASG sampling loop (DDIM with the Gaussian noise replaced by the
   normalised gradient of the RASG score), written against a k-diffusion style
   ``model(x, sigma, **extra_args)`` callable.

Where the paper and the official code differ, the official code is followed; the open
choices are options (see docs/hd-painter.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

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


def painta_rescale(scores: torch.Tensor, c: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """PAIntA's rescaled self-attention scores.

    scores: ``[..., n, n]`` pre-softmax self-attention scores (rows = queries); c: ``[n]``;
    hole: ``[n]`` (bool, or float with > 0.5 meaning hole). ``C[i, j] = c[j]`` when pixel i
    is in the hole and pixel j is known, else 1. Returns ``scores * C``.
    """
    h = _hole_bool(hole).to(scores.device)
    factor = torch.where(~h, c.to(scores.dtype), torch.ones_like(c, dtype=scores.dtype))   # [n] over keys j
    rows = h[:, None]                                                                       # [n, 1] over queries i
    C = torch.where(rows, factor[None, :], torch.ones((), dtype=scores.dtype, device=scores.device))
    return scores * C


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


# ------------------------------------------------------------------------------ UNet plumbing

STATE_KEY = "hd_painter_state"


def transformer_block(unet, block, block_index: int):
    """The BasicTransformerBlock that a ComfyUI ``transformer_options['block']`` points at."""
    name, number = block[0], block[1]
    if name == "input":
        container = unet.input_blocks[number]
    elif name == "output":
        container = unet.output_blocks[number]
    else:
        container = unet.middle_block
    for module in container:
        if hasattr(module, "transformer_blocks"):
            return module.transformer_blocks[block_index]
    raise RuntimeError(f"no transformer block at {block}")


def level_of(extra_options: dict) -> int:
    """UNet level of the current transformer: round(log2(latent size / map size))."""
    full = extra_options["original_shape"][-2]
    here = extra_options["activations_shape"][-2]
    return int(round(math.log2(full / here)))


def map_size(extra_options: dict) -> tuple[int, int]:
    shape = extra_options["activations_shape"]
    return int(shape[-2]), int(shape[-1])


def chunk_rows(batch: int, cond_or_uncond: Sequence[int]) -> list[tuple[int, slice]]:
    """(cond flag, row slice) per chunk of a CFG batch (0 = positive, 1 = negative)."""
    chunks = list(cond_or_uncond) or [0]
    per = batch // len(chunks)
    return [(flag, slice(i * per, (i + 1) * per)) for i, flag in enumerate(chunks)]


def _heads_split(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2)        # [b, heads, n, d]


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention scores in at least fp32 (fp16/bf16 models), in fp64 for fp64 models."""
    return torch.promote_types(dtype, torch.float32)


def cross_logits(attn2, hidden: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-softmax cross-attention scores ``[b, heads, n, L]``, at least fp32 (hidden = norm2(x))."""
    dtype = _score_dtype(hidden.dtype)
    q = _heads_split(attn2.to_q(hidden).to(dtype), heads)
    k = _heads_split(attn2.to_k(context.to(hidden.dtype)).to(dtype), heads)
    return q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)


@dataclass
class CallState:
    """Per UNet call data, created by the diffusion-model wrapper."""

    unet: object
    timesteps: torch.Tensor
    context: torch.Tensor
    latent_mask: torch.Tensor | None                  # [B, h, w] concat mask (inpainting UNets)
    stash: dict = field(default_factory=dict)


def call_state(extra_options: dict) -> CallState | None:
    return extra_options.get(STATE_KEY)


def diffusion_model_wrapper(executor, x, timesteps=None, context=None, y=None, control=None,
                            transformer_options=None, **kwargs):
    """Wrapper around ``UNetModel.forward``: keeps the UNet, timesteps, context and (for
    9-channel inpainting UNets) the concat mask where the patches of this call can see them."""
    transformer_options = dict(transformer_options or {})
    if transformer_options.get(STATE_KEY) is None:
        mask = x[:, 4].detach() if x.shape[1] == 9 else None
        transformer_options[STATE_KEY] = CallState(executor.class_obj, timesteps, context, mask)
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


POSITIVE_KEY = "hd_painter_positive_context"


def positive_context_wrapper(executor, model, conds, x_in, timestep, model_options):
    """Wrapper around ComfyUI's cond batching: keeps the first positive text context in the
    transformer options, for model calls that carry only the negative half (low memory)."""
    context = None
    try:
        context = conds[0][0]["model_conds"]["c_crossattn"].cond
    except (TypeError, KeyError, IndexError, AttributeError):
        pass
    if context is not None:
        model_options = dict(model_options)
        options = dict(model_options.get("transformer_options", {}))
        options[POSITIVE_KEY] = context
        model_options["transformer_options"] = options
    return executor(model, conds, x_in, timestep, model_options)


def _hole_for_rows(state: CallState, pixel_mask: torch.Tensor | None, rows: slice, batch: int,
                   h: int, w: int, device) -> torch.Tensor | None:
    """Hole ``[rows, h*w]`` bool for some rows of the UNet batch."""
    if pixel_mask is not None:
        per_sample = rows.stop - rows.start
        m = pixel_mask
        if m.shape[0] not in (1, per_sample):
            m = m[torch.arange(per_sample) % m.shape[0]]
        hole = mask_at_level(m.to(device), h, w)
        return hole.expand(per_sample, -1) if hole.shape[0] == 1 else hole
    if state.latent_mask is None:
        return None
    return mask_at_level(state.latent_mask[rows].to(device), h, w)


class _SharedByCopies:
    """Patch objects are stored in ComfyUI's model_options, which ModelPatcher.clone()
    deep-copies; the patch is immutable configuration, so copies share it."""

    def __deepcopy__(self, memo):
        return self


class PaintaPatch(_SharedByCopies):
    """PAIntA as attn1/attn1-output/middle patches.

    attn1_patch stores LN1(x); attn1_output_patch stores the standard self-attention output
    y (after ``to_out``; computed by the host's optimised attention); middle_patch, at the
    patched levels and while active, recomputes the self-attention of the hole rows with
    PAIntA's rescaled scores and replaces their contribution: x = x - y + y'. Known rows keep
    the optimised result (their C row is all ones, so PAIntA leaves them unchanged).
    """

    def __init__(self, token_indices: Sequence[int], *, mask: torch.Tensor | None = None,
                 end_timestep: float = PAINTA_END_TIMESTEP, levels: Iterable[int] = PAINTA_LEVELS):
        self.tokens = list(token_indices)
        self.mask = mask                     # prepared pixel mask [B, H, W] or None (use the concat mask)
        self.end_timestep = float(end_timestep)
        self.levels = frozenset(levels)

    # ComfyUI model patcher wiring (duck-typed ModelPatcher methods)
    def install(self, patcher, key: str = "hd_painter_painta") -> None:
        patcher.set_model_attn1_patch(self.attn1_patch)
        patcher.set_model_attn1_output_patch(self.attn1_output_patch)
        patcher.set_model_patch(self.middle_patch, "middle_patch")
        patcher.add_wrapper_with_key("diffusion_model", key, diffusion_model_wrapper)
        patcher.add_wrapper_with_key("diffusion_model", key, self.attention_capture_wrapper)
        patcher.add_wrapper_with_key("calc_cond_batch", key, positive_context_wrapper)

    def attention_capture_wrapper(self, executor, x, timesteps=None, context=None, y=None, control=None,
                                  transformer_options=None, **kwargs):
        """Installs an attention override (chained to any existing one) that keeps the
        projected q, k, v of the patched self-attentions, so that the hole rows can be
        recomputed without projecting again."""
        transformer_options = dict(transformer_options or {})
        previous = transformer_options.get("optimized_attention_override")

        def override(func, *args, **kw):
            opts = kw.get("transformer_options") or {}
            state = call_state(opts)
            if state is not None and len(args) >= 3 and not kw.get("skip_reshape", False):
                saved = state.stash.get(self._key(opts))
                q, k = args[0], args[1]
                if saved is not None and "qkv" not in saved and "y" not in saved and q.shape[1] == k.shape[1]:
                    saved["qkv"] = args[:3]
            if previous is not None:
                return previous(func, *args, **kw)
            return func(*args, **kw)

        transformer_options["optimized_attention_override"] = override
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _wanted(self, extra_options: dict) -> CallState | None:
        state = call_state(extra_options)
        if state is None or level_of(extra_options) not in self.levels:
            return None
        if not bool((state.timesteps > self.end_timestep).any()):
            return None
        return state

    @staticmethod
    def _key(extra_options: dict):
        return ("painta", tuple(extra_options.get("block") or ()), extra_options.get("block_index", 0))

    def attn1_patch(self, n, context_attn1, value_attn1, extra_options):
        state = self._wanted(extra_options)
        if state is not None:
            state.stash[self._key(extra_options)] = {"n": n}
        return n, context_attn1, value_attn1

    def attn1_output_patch(self, y, extra_options):
        state = self._wanted(extra_options)
        if state is not None and self._key(extra_options) in state.stash:
            state.stash[self._key(extra_options)]["y"] = y
        return y

    def middle_patch(self, x, extra_options):
        state = self._wanted(extra_options)
        if state is None:
            return x
        saved = state.stash.pop(self._key(extra_options), None)
        if saved is None or "y" not in saved:
            return x
        block = transformer_block(state.unet, extra_options["block"], extra_options.get("block_index", 0))
        heads = extra_options["n_heads"]
        h, w = map_size(extra_options)
        chunks = chunk_rows(x.shape[0], extra_options.get("cond_or_uncond", [0]))
        context = state.context
        per = x.shape[0] // len(chunks)
        # c from the conditional chunk(s): LN2(x_cond) against the positive context.
        factors = [None] * per
        for flag, rows in chunks:
            if flag != 0:
                continue
            logits = cross_logits(block.attn2, block.norm2(x[rows]), context[rows], heads)
            probs = logits.softmax(-1).mean(1)                               # [per, n, L]
            c = painta_factors(probs, self.tokens, h, w)
            for s in range(per):
                if factors[s] is None:
                    factors[s] = c[s]
        if all(f is None for f in factors):
            # A call without the positive half (ComfyUI ran the negative alone): relevance of
            # these rows' own hidden states for the positive context (kept by
            # positive_context_wrapper), else for their own context.
            positive = extra_options.get(POSITIVE_KEY)
            ctx = context if positive is None else positive[:1].to(x.device, x.dtype).expand(x.shape[0], -1, -1)
            logits = cross_logits(block.attn2, block.norm2(x), ctx, heads)
            c = painta_factors(logits.softmax(-1).mean(1), self.tokens, h, w)
            factors = [c[s] for s in range(per)]
        active = state.timesteps > self.end_timestep
        qkv = saved.get("qkv")
        if qkv is None:          # an attn1 replace patch of another node bypassed the override
            n1 = saved["n"]
            qkv = (block.attn1.to_q(n1), block.attn1.to_k(n1), block.attn1.to_v(n1))
        y_std = saved["y"]
        out = x.clone()
        for flag, rows in chunks:
            hole = _hole_for_rows(state, self.mask, rows, x.shape[0], h, w, x.device)
            if hole is None:
                continue
            for s in range(per):
                b = rows.start + s
                if not bool(active[b]):
                    continue
                self._replace_rows(out, b, block.attn1, [t[b] for t in qkv], y_std[b], factors[s], hole[s], heads)
        return out

    @staticmethod
    def _replace_rows(x, b, attn1, qkv, y_std, c, hole, heads) -> None:
        """x[b, hole rows] += to_out(softmax(A * C) V) - y_std for those rows (in place)."""
        idx = hole.nonzero(as_tuple=True)[0]
        if idx.numel() == 0 or idx.numel() == hole.numel():
            return
        q_all, k_all, v_all = qkv                                          # [n, heads * d] each
        q = _heads_split(q_all[idx][None], heads)[0]                       # [heads, nh, d]
        k = _heads_split(k_all[None], heads)[0]                            # [heads, n, d]
        v = _heads_split(v_all[None], heads)[0]
        dtype = _score_dtype(q.dtype)
        scores = q.to(dtype) @ k.to(dtype).transpose(-1, -2) * (q.shape[-1] ** -0.5)   # [heads, nh, n]
        known = ~hole
        scale = torch.where(known, c.to(dtype), torch.ones_like(c, dtype=dtype))        # hole rows of C
        probs = (scores * scale).softmax(-1).to(v.dtype)
        out = (probs @ v).transpose(0, 1).reshape(idx.numel(), -1)        # [nh, inner]
        y_new = attn1.to_out(out[None])[0]
        x[b, idx] = x[b, idx] - y_std[idx] + y_new.to(x.dtype)


class RasgCapture(_SharedByCopies):
    """attn2 patch that records the pre-softmax cross-attention logits of the conditional
    rows at the RASG level, for the score of the current call."""

    def __init__(self, level: int = RASG_LEVEL):
        self.level = level
        self.states: list[CallState] = []

    def attn2_patch(self, n, context, value, extra_options):
        state = call_state(extra_options)
        if state is not None and level_of(extra_options) == self.level:
            block = transformer_block(state.unet, extra_options["block"], extra_options.get("block_index", 0))
            heads = extra_options["n_heads"]
            for flag, rows in chunk_rows(n.shape[0], extra_options.get("cond_or_uncond", [0])):
                if flag == 0:
                    logits = cross_logits(block.attn2, n[rows], context[rows], heads).mean(1)   # [per, n, L]
                    state.stash.setdefault("rasg_logits", []).append(logits)
                    state.stash.setdefault("rasg_shape", map_size(extra_options))
                    state.stash["rasg_rows"] = rows
            if not any(st is state for st in self.states):
                self.states.append(state)
        return n, context, value

    def start(self) -> None:
        self.states = []

    def score(self, pixel_mask: torch.Tensor | None, tokens: Sequence[int]) -> torch.Tensor:
        """Sum over samples of ``rasg_score`` of the layer-mean logits captured since start()."""
        per_sample: dict[int, list] = {}
        hole_of: dict[int, torch.Tensor] = {}
        for state in self.states:
            logits = state.stash.get("rasg_logits")
            if not logits:
                continue
            h, w = state.stash["rasg_shape"]
            rows = state.stash["rasg_rows"]
            hole = _hole_for_rows(state, pixel_mask, rows, 0, h, w, logits[0].device)
            if hole is not None and pixel_mask is None:
                check_hole(state.latent_mask[rows], "the inpainting mask")
            if hole is None:
                raise InputError("RASG needs a mask: use an inpainting (9-channel) SD1.5 model with "
                                 "InpaintModelConditioning, or connect a MASK to the RASG sampler.")
            for layer in logits:
                for s in range(layer.shape[0]):
                    per_sample.setdefault(s, []).append(layer[s])
                    hole_of[s] = hole[s]
        if not per_sample:
            raise InputError("RASG found no cross-attention at the 1/4 latent level: the model is not an SD1.5 "
                             "UNet, or the prompt (positive conditioning) was not used.")
        total = None
        for s, layers in per_sample.items():
            value = rasg_score(torch.stack(layers).mean(0), tokens, hole_of[s])
            total = value if total is None else total + value
        return total


# ------------------------------------------------------------------------------ sampler

def _with_capture(model_options: dict, capture: RasgCapture, attention_override) -> dict:
    """A copy of model_options with the capture patch, the state wrapper and (for the
    gradient pass) a differentiable attention backend."""
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["attn2_patch"] = list(patches.get("attn2_patch", [])) + [capture.attn2_patch]
    to["patches"] = patches
    wrappers = {k: dict(v) for k, v in to.get("wrappers", {}).items()}
    wrappers.setdefault("diffusion_model", {})["hd_painter_rasg"] = [diffusion_model_wrapper]
    to["wrappers"] = wrappers
    if attention_override is not None:
        to["optimized_attention_override"] = attention_override
    mo["transformer_options"] = to
    return mo


def make_parameters_differentiable(module: torch.nn.Module, device: torch.device | None = None) -> int:
    """Replace inference-mode Parameters (ComfyUI loads models under torch.inference_mode)
    by ordinary frozen clones so that a backward pass to the input can save them. Only
    parameters on ``device`` are touched (offloaded weights are copied per call anyway).
    Must be called outside inference mode. Returns how many were replaced."""
    replaced = 0
    for name, param in list(module.named_parameters()):
        if not param.is_inference() or (device is not None and param.device != device):
            continue
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, leaf, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
        replaced += 1
    return replaced


def rasg_gradient(model, x, sigma, extra_args: dict, grad_options: dict, capture: RasgCapture,
                  tokens: Sequence[int], mask: torch.Tensor | None = None,
                  check_interrupt: Callable[[], None] | None = None):
    """One forward pass with the gradient enabled w.r.t. x only, and the gradient of the RASG
    score. Returns (denoised (detached), grad_x S, S (detached))."""
    with torch.inference_mode(False), torch.enable_grad():
        x_g = x.detach().clone().requires_grad_(True)
        args = dict(extra_args)
        args["model_options"] = grad_options
        if args.get("denoise_mask") is not None:
            args["denoise_mask"] = args["denoise_mask"].clone()
        capture.start()
        try:
            denoised = model(x_g, sigma.clone(), **args)
            score = capture.score(mask, tokens)
            if check_interrupt is not None:
                check_interrupt()
            (grad,) = torch.autograd.grad(score, x_g)
        finally:
            capture.start()
    return denoised.detach(), grad, score.detach()


def rasg_options(model_options: dict, attention_override=None) -> tuple[dict, RasgCapture]:
    """model_options for RASG's gradient passes, and the capture they feed."""
    capture = RasgCapture()
    return _with_capture(model_options, capture, attention_override), capture


def sample_rasg(model, x, sigmas, extra_args=None, callback=None, disable=None, *, tokens: Sequence[int],
                eta: float = 0.1, sigma_mode: str = "official_code", mask: torch.Tensor | None = None,
                sigma_table: torch.Tensor, unet: torch.nn.Module | None = None, attention_override=None,
                check_interrupt: Callable[[], None] | None = None):
    """RASG sampling (k-diffusion sampler signature; ``model`` is ComfyUI's wrapped model).

    Each step: a forward pass with the gradient enabled w.r.t. x only (the UNet weights get
    no gradient), the RASG score from the captured logits, its gradient, then
    ``x_next = D + sqrt(sigma_next^2 - u^2) eps + u grad/std(grad)``. The last step (to
    sigma 0) returns the denoised prediction without a backward pass.
    """
    extra_args = dict(extra_args or {})
    s_in = x.new_ones([x.shape[0]])
    grad_options, capture = rasg_options(extra_args.get("model_options", {}), attention_override)
    with torch.inference_mode(False):
        if unet is not None:
            make_parameters_differentiable(unet, x.device)
    for i in range(len(sigmas) - 1):
        if check_interrupt is not None:
            check_interrupt()
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma_next <= 0 or eta == 0:
            with torch.no_grad():
                denoised = model(x, sigmas[i] * s_in, **extra_args)
            x_next = denoised if sigma_next <= 0 else denoised + sigma_next * (x - denoised) / sigma
        else:
            denoised, grad, _ = rasg_gradient(model, x, sigmas[i] * s_in, extra_args, grad_options, capture,
                                              tokens, mask, check_interrupt)
            u = rasg_noise_scale(sigma, sigma_next, eta, sigma_mode, sigma_table)
            x_next = rasg_update(x, denoised, sigma, sigma_next, u, normalise_gradient(grad))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x_next
    return x

