"""ASUKA on FLUX.1-Fill: MAE prior features -> the conditioning FLUX reads instead of a prompt.

The released ASUKA-FLUX.1-Fill pipeline feeds the FLUX transformer no text at all. From
the MAE features ``F`` ``[B, 256, 512]`` it builds

* ``txt``    = aligner_T5(F)                     ``[B, 256, 4096]``  (replaces the T5 tokens)
* ``pooled`` = mean over tokens of aligner_CLIP(F)  ``[B, 768]``     (replaces CLIP-L's pooled vector)

and then, with ``w = weight`` (official default 0.5, the README's "CFG 0.5"), moves both
toward the embeddings of the empty prompt::

    txt    = txt_empty    + w * (txt    - txt_empty)
    pooled = pooled_empty + w * (pooled - pooled_empty)

This is a single-pass interpolation in conditioning space, not classifier-free guidance;
``w = 1`` is the pure prior (what the paper used). FLUX.1-Fill then samples with the
distilled guidance embedding 30 and cfg 1.

In ComfyUI terms the result is one CONDITIONING entry of batch B,
``[txt, {"pooled_output": pooled, "guidance": 30.0}]``; ComfyUI builds the (all-zero)
text position ids itself. See docs/flux.md.

Without an empty-prompt embedding there is nothing official to blend toward, so
:func:`blend_toward_empty` refuses any weight other than 1 in that case rather than
invent a reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .aligner import MAE_TOKENS, TARGET_FLUX_CLIP, TARGET_FLUX_T5, TARGET_WIDTHS, Aligner, check_features
from .errors import CheckpointError, InputError, finite_number

T5_WIDTH = TARGET_WIDTHS[TARGET_FLUX_T5]        # 4096
POOLED_WIDTH = TARGET_WIDTHS[TARGET_FLUX_CLIP]  # 768
DEFAULT_WEIGHT = 0.5     # official condition_weight
DEFAULT_GUIDANCE = 30.0  # official FLUX.1-Fill distilled guidance

_EMPTY_HINT = (
    "Connect the FLUX encoding of an empty prompt: DualCLIPLoader (clip_l + t5xxl, type flux) "
    "-> CLIP Text Encode with no text -> 'empty'."
)


@dataclass
class FluxConditioning:
    """What the FLUX transformer receives instead of a prompt."""

    txt: torch.Tensor     # [B, 256, 4096] float32: the token sequence (cross_attn)
    pooled: torch.Tensor  # [B, 768] float32: the pooled vector (pooled_output -> y)
    guidance: float

    def comfy(self) -> list:
        """ComfyUI CONDITIONING: one entry whose batch is B (several entries would each be
        run on the whole latent batch and averaged)."""
        return [[self.txt, {"pooled_output": self.pooled, "guidance": self.guidance}]]


def pooled_from_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The CLIP-branch aligner's tokens ``[B, 256, 768]`` -> FLUX's pooled vector ``[B, 768]``."""
    return tokens.mean(dim=1)


def check_weight(weight) -> float:
    return finite_number("weight", weight)


def check_guidance(guidance) -> float:
    return finite_number("guidance", guidance, minimum=0.0)


def check_empty(txt, pooled, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an empty-prompt embedding: ``txt`` ``[1 or B, 256, 4096]``, ``pooled``
    ``[1 or B, 768]``. Returns both as float32."""
    if not isinstance(txt, torch.Tensor) or txt.ndim != 3 or txt.shape[2] != T5_WIDTH:
        got = list(txt.shape) if isinstance(txt, torch.Tensor) else type(txt).__name__
        raise InputError(
            f"'empty' should be FLUX conditioning (T5 tokens [1,256,{T5_WIDTH}]), got a tensor {got}. "
            "Is it the output of an SD1.5 or SDXL text encoder? " + _EMPTY_HINT
        )
    if txt.shape[1] != MAE_TOKENS:
        raise InputError(
            f"'empty' has {txt.shape[1]} T5 tokens; the blend needs exactly {MAE_TOKENS} (what FLUX's "
            f"CLIP Text Encode gives for an empty or short prompt, and the official empty embedding). "
            "Use an empty prompt."
        )
    if pooled is None:
        raise InputError("'empty' has no pooled_output (FLUX needs CLIP-L's pooled vector). " + _EMPTY_HINT)
    if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or pooled.shape[1] != POOLED_WIDTH:
        got = list(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise InputError(
            f"'empty' has a pooled_output {got}; FLUX's is [1,{POOLED_WIDTH}] (CLIP-L, unprojected). "
            + _EMPTY_HINT
        )
    for name, t in (("T5 tokens", txt), ("pooled_output", pooled)):
        if t.shape[0] not in (1, batch):
            raise InputError(
                f"'empty' {name} have batch {t.shape[0]}, the prior has {batch}: use one empty prompt "
                "(batch 1) for the whole batch."
            )
    if txt.shape[0] != pooled.shape[0]:
        raise InputError(f"'empty' T5 tokens (batch {txt.shape[0]}) and pooled_output (batch "
                         f"{pooled.shape[0]}) do not match.")
    if not (torch.isfinite(txt).all() and torch.isfinite(pooled).all()):
        raise InputError("'empty' contains NaN or infinite values.")
    return txt.float(), pooled.float()


def check_blend(weight: float, empty_txt, empty_pooled, batch: int):
    """Validated ``(empty_txt, empty_pooled)`` as float32, or None when no empty embedding
    is given, which only weight 1 allows."""
    if empty_txt is None and empty_pooled is None:
        if weight != 1.0:
            raise InputError(
                f"weight {weight:g} blends the ASUKA conditioning toward the empty prompt, but no "
                f"'empty' conditioning is connected. {_EMPTY_HINT} Or set weight to 1.0 (pure ASUKA "
                "prior, the paper's setting), which needs no text encoder."
            )
        return None
    return check_empty(empty_txt, empty_pooled, batch)


def blend_toward_empty(txt: torch.Tensor, pooled: torch.Tensor, weight: float,
                       empty_txt: torch.Tensor | None = None,
                       empty_pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``empty + weight * (prior - empty)`` for the tokens and the pooled vector.

    The empty embedding (batch 1 or B) is broadcast over the batch. ``weight`` 1 returns the
    prior conditioning unchanged (``empty`` is then optional); without ``empty`` any other
    weight is an :class:`InputError`, because there is no official reference to blend toward.
    """
    weight = check_weight(weight)
    empty = check_blend(weight, empty_txt, empty_pooled, txt.shape[0])
    if empty is None:
        return txt, pooled
    e_txt, e_pooled = empty
    e_txt = e_txt.to(txt.device).expand_as(txt)
    e_pooled = e_pooled.to(pooled.device).expand_as(pooled)
    # lerp(start, end, w) = start + w * (end - start): exact at w = 0 and w = 1
    return torch.lerp(e_txt, txt, weight), torch.lerp(e_pooled, pooled, weight)


def flux_conditioning(features: torch.Tensor, clip_aligner, t5_aligner, *,
                      weight: float = DEFAULT_WEIGHT, guidance: float = DEFAULT_GUIDANCE,
                      empty_txt: torch.Tensor | None = None, empty_pooled: torch.Tensor | None = None,
                      activate: Callable[[object], Aligner] | None = None) -> FluxConditioning:
    """MAE features ``[B, 256, 512]`` -> :class:`FluxConditioning` (the official recipe).

    ``clip_aligner`` must be the pooled-vector branch (target ``flux_clip``, width 768,
    e.g. ``asuka_alignment_clip.pt``), ``t5_aligner`` the token branch (``flux_t5``, 4096,
    ``asuka_alignment_t5.pt``); the wrong one in a slot is a CheckpointError.
    ``activate(obj) -> Aligner`` is called on each just before it runs (the ComfyUI node
    passes model patchers and lets ComfyUI place them); by default they are used as given.
    """
    weight, guidance = check_weight(weight), check_guidance(guidance)
    features = check_features(features)
    check_blend(weight, empty_txt, empty_pooled, features.shape[0])  # fail before any model runs
    activate = activate or (lambda a: a)
    check_slots(clip_aligner, t5_aligner)
    pooled = pooled_from_tokens(activate(clip_aligner)(features))
    txt = activate(t5_aligner)(features)
    txt, pooled = blend_toward_empty(txt, pooled, weight, empty_txt, empty_pooled)
    return FluxConditioning(txt.contiguous(), pooled.contiguous(), guidance)


def check_slots(clip_aligner, t5_aligner) -> None:
    """CheckpointError unless the pooled-vector and token-branch aligners are where they belong."""
    models = aligner_of(clip_aligner), aligner_of(t5_aligner)
    swapped = models[0].target == TARGET_FLUX_T5 and models[1].target == TARGET_FLUX_CLIP
    for model, target, slot in ((models[0], TARGET_FLUX_CLIP, "clip_aligner"),
                                (models[1], TARGET_FLUX_T5, "t5_aligner")):
        try:
            model.expect_target(target, where=f"ASUKA FLUX conditioning ('{slot}')")
        except CheckpointError as e:
            if swapped:
                raise CheckpointError(f"{e} The two aligners are swapped: connect asuka_alignment_clip.pt "
                                      "to 'clip_aligner' and asuka_alignment_t5.pt to 't5_aligner'.") from None
            raise


def activation_bytes(aligner: Aligner, batch: int) -> int:
    """Rough peak of one aligner forward beyond its weights (float32 worst case): the 7D
    projection and the 5D concatenation of one block, for ``batch`` images."""
    return batch * MAE_TOKENS * aligner.width * 12 * 4


def aligner_of(obj) -> Aligner:
    """The :class:`Aligner` inside ``obj`` (itself, or a wrapper's ``.model``)."""
    model = obj if isinstance(obj, Aligner) else getattr(obj, "model", None)
    if not isinstance(model, Aligner):
        raise CheckpointError(
            f"expected an ASUKA aligner (Load ASUKA Aligner), got {type(obj).__name__}."
        )
    return model
