"""ComfyUI plumbing of HD-Painter: how the maths of ``asuka_core.hd_painter`` reaches
ComfyUI's SD1.5 UNet call.

* ``PaintaPatch``: attn1 / attn1-output / middle patches, a diffusion-model wrapper and an
  attention override (chained to any other) that keep what PAIntA needs of each patched
  self-attention and replace the hole rows' result by ``hp.painta_hole_attention``.
* ``RasgCapture``: an attn2 patch that records the pre-softmax cross-attention logits
  (``hp.cross_logits``) of the conditional rows at the RASG level, for ``hp.rasg_score``.
* ``rasg_sampler``: the KSAMPLER function: builds the two denoiser callables of
  ``hp.sample_rasg`` from ComfyUI's wrapped model, with the gradient pass under
  ``nodes.gradients`` (scoped differentiable weights, attention with a backward pass).

These read ComfyUI's ``transformer_options`` (``cond_or_uncond``, ``block``,
``block_index``, ``original_shape``, ``activations_shape``, ``n_heads``) and the
``model_conds`` of its cond batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ..asuka_core import hd_painter as hp
from ..asuka_core.errors import GradientError, InputError, ModelStateError
from . import gradients

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
    raise ModelStateError(f"HD-Painter: the UNet has no transformer block at {tuple(block)}, where ComfyUI's "
                          "attention patch points: another node changed the model's structure. Apply HD-Painter "
                          "to the model as the checkpoint loader gives it.")


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
        hole = hp.mask_at_level(m.to(device), h, w)
        return hole.expand(per_sample, -1) if hole.shape[0] == 1 else hole
    if state.latent_mask is None:
        return None
    return hp.mask_at_level(state.latent_mask[rows].to(device), h, w)


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
                 end_timestep: float = hp.PAINTA_END_TIMESTEP, levels: Iterable[int] = hp.PAINTA_LEVELS):
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
            logits = hp.cross_logits(block.attn2, block.norm2(x[rows]), context[rows], heads)
            probs = logits.softmax(-1).mean(1)                               # [per, n, L]
            c = hp.painta_factors(probs, self.tokens, h, w)
            for s in range(per):
                if factors[s] is None:
                    factors[s] = c[s]
        if all(f is None for f in factors):
            # A call without the positive half (ComfyUI ran the negative alone): relevance of
            # these rows' own hidden states for the positive context (kept by
            # positive_context_wrapper), else for their own context.
            positive = extra_options.get(POSITIVE_KEY)
            ctx = context if positive is None else positive[:1].to(x.device, x.dtype).expand(x.shape[0], -1, -1)
            logits = hp.cross_logits(block.attn2, block.norm2(x), ctx, heads)
            c = hp.painta_factors(logits.softmax(-1).mean(1), self.tokens, h, w)
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
        """x[b, hole rows] += to_out(PAIntA attention) - y_std for those rows (in place)."""
        result = hp.painta_hole_attention(*qkv, c, hole, heads)
        if result is None:
            return
        idx, out = result
        y_new = attn1.to_out(out[None])[0]
        x[b, idx] = x[b, idx] - y_std[idx] + y_new.to(x.dtype)


class RasgCapture(_SharedByCopies):
    """attn2 patch that records the pre-softmax cross-attention logits of the conditional
    rows at the RASG level, for the score of the current call."""

    def __init__(self, level: int = hp.RASG_LEVEL):
        self.level = level
        self.states: list[CallState] = []

    def attn2_patch(self, n, context, value, extra_options):
        state = call_state(extra_options)
        if state is not None and level_of(extra_options) == self.level:
            block = transformer_block(state.unet, extra_options["block"], extra_options.get("block_index", 0))
            heads = extra_options["n_heads"]
            for flag, rows in chunk_rows(n.shape[0], extra_options.get("cond_or_uncond", [0])):
                if flag == 0:
                    logits = hp.cross_logits(block.attn2, n[rows], context[rows], heads).mean(1)   # [per, n, L]
                    state.stash.setdefault("rasg_logits", []).append(logits)
                    state.stash.setdefault("rasg_shape", map_size(extra_options))
                    state.stash["rasg_rows"] = rows
            if not any(st is state for st in self.states):
                self.states.append(state)
        return n, context, value

    def start(self) -> None:
        self.states = []

    def score(self, pixel_mask: torch.Tensor | None, tokens: Sequence[int]) -> torch.Tensor:
        """Sum over samples of ``hp.rasg_score`` of the layer-mean logits captured since start()."""
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
                hp.check_hole(state.latent_mask[rows], "the inpainting mask")
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
            value = hp.rasg_score(torch.stack(layers).mean(0), tokens, hole_of[s])
            total = value if total is None else total + value
        return total




# ------------------------------------------------------------------------------ sampler

def _with_capture(model_options: dict, capture: RasgCapture) -> dict:
    """A copy of model_options (the caller's dicts are never changed) with the capture
    patch, the state wrapper and an attention backend with a backward pass."""
    mo = dict(model_options)
    to = gradients.chain_attention_override(mo.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["attn2_patch"] = list(patches.get("attn2_patch", [])) + [capture.attn2_patch]
    to["patches"] = patches
    wrappers = {k: dict(v) for k, v in to.get("wrappers", {}).items()}
    wrappers.setdefault("diffusion_model", {})["hd_painter_rasg"] = [diffusion_model_wrapper]
    to["wrappers"] = wrappers
    mo["transformer_options"] = to
    return mo


def rasg_options(model_options: dict) -> tuple[dict, RasgCapture]:
    """model_options for RASG's gradient passes, and the capture they feed."""
    capture = RasgCapture()
    return _with_capture(model_options, capture), capture


def rasg_gradient(model, x, sigma, extra_args: dict, grad_options: dict, capture: RasgCapture,
                  tokens: Sequence[int], mask: torch.Tensor | None = None,
                  check_interrupt: Callable[[], None] | None = None):
    """One forward pass with the gradient enabled w.r.t. x only, and the gradient of the RASG
    score. The UNet's weights must be differentiable (``gradients.differentiable_unet``).
    Returns (denoised (detached), grad_x S, S (detached))."""
    with torch.inference_mode(False), torch.enable_grad():
        x_g = x.detach().clone().requires_grad_(True)
        args = dict(extra_args)
        args["model_options"] = grad_options
        if args.get("denoise_mask") is not None:
            args["denoise_mask"] = args["denoise_mask"].clone()
        capture.start()
        try:
            with gradients.saved_cast_buffers_copied():
                denoised = model(x_g, sigma.clone(), **args)
            score = capture.score(mask, tokens)
            if check_interrupt is not None:
                check_interrupt()
            if not score.requires_grad:
                raise GradientError(
                    "HD-Painter RASG: the RASG score does not depend on the latent, so there is no gradient to "
                    "guide with: a patch or attention backend on this model runs without autograd. Remove "
                    "other attention patches from the model, or sample it with another sampler.")
            (grad,) = torch.autograd.grad(score, x_g)
        finally:
            capture.start()
    return denoised.detach(), grad, score.detach()


def rasg_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, tokens: Sequence[int],
                 eta: float, sigma_mode: str, mask: torch.Tensor | None, check_interrupt=None):
    """KSAMPLER sampler function (``model`` is ComfyUI's wrapped model: ``model.inner_model``
    the CFG guider, its ``inner_model`` the BaseModel, its ``model_patcher`` the patcher).
    The UNet's weights are differentiable copies only while this call runs."""
    extra_args = dict(extra_args or {})
    guider = model.inner_model
    base = guider.inner_model
    gradients.refuse_streamed_weights(getattr(guider, "model_patcher", None), "HD-Painter RASG Sampler")
    grad_options, capture = rasg_options(extra_args.get("model_options", {}))

    def denoise(x_, sigma):
        with torch.no_grad():
            return model(x_, sigma, **extra_args)

    def guided(x_, sigma):
        denoised, grad, _ = rasg_gradient(model, x_, sigma, extra_args, grad_options, capture, tokens, mask,
                                          check_interrupt)
        return denoised, grad

    with gradients.differentiable_unet(base.diffusion_model, x.device):
        return hp.sample_rasg(denoise, guided, x, sigmas, eta=eta, sigma_mode=sigma_mode,
                              sigma_table=base.model_sampling.sigmas, callback=callback,
                              check_interrupt=check_interrupt)
