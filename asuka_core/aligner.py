"""The ASUKA aligner: MAE prior features ``[B, 256, 512]`` -> conditioning tokens ``[B, 256, D]``.

Layout (the official ``nn.Sequential``; its indices are the state-dict prefixes):

* ``0``: Linear 512 -> D;
* ``1`` .. ``N``: single-stream transformer blocks of width D, D/64 heads of 64;
* ``N+1``: LayerNorm(D), affine, eps 1e-5.

A block is FLUX's single-stream block without its modulation: an affine-free LayerNorm
(eps 1e-6), one linear D -> 7D split into q, k, v (3D) and an MLP stream (4D), per-head
RMS normalisation of q and k (float32, eps 1e-6, learned scale of 64), plain
scaled-dot-product attention with no mask and no positional encoding, tanh-GELU on the
MLP stream, one linear 5D -> D over ``[attention, mlp]``, and a residual with no gate.
The official files still carry each block's unused ``modulation.lin`` weights; they are
accepted and dropped (never built).

The official release has two aligners, both for FLUX.1-Fill: D = 768 (its token mean
replaces FLUX's pooled CLIP vector) and D = 4096 (replaces the T5 token sequence). An
SD1.5 aligner has the same shapes as the 768 one, so it must say what it is for in its
safetensors metadata (``asuka.target = sd15``); see docs/aligner.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    KIND_ALIGNER,
    SAFETENSORS_EXTENSIONS,
    Checkpoint,
    as_checkpoint,
    expect_kind,
    save_safetensors,
    unwrap_state_dict,
)
from .errors import CheckpointError, InputError, finite_number
from .runtime import compute_device_dtype, resolve_ops

TARGET_SD15 = "sd15"
TARGET_FLUX_CLIP = "flux_clip"
TARGET_FLUX_T5 = "flux_t5"
TARGETS = (TARGET_SD15, TARGET_FLUX_CLIP, TARGET_FLUX_T5)
# Output width each target needs: SD1.5 cross-attention context, FLUX's pooled CLIP-L
# vector, FLUX's T5-XXL token width.
TARGET_WIDTHS = {TARGET_SD15: 768, TARGET_FLUX_CLIP: 768, TARGET_FLUX_T5: 4096}
TARGET_NAMES = {
    TARGET_SD15: "Stable Diffusion 1.5 (cross-attention tokens)",
    TARGET_FLUX_CLIP: "FLUX.1 pooled CLIP vector (asuka_alignment_clip.pt)",
    TARGET_FLUX_T5: "FLUX.1 T5 token sequence (asuka_alignment_t5.pt)",
}

MAE_TOKENS = 256
MAE_WIDTH = 512
HEAD_DIM = 64
METADATA_TARGET = "asuka.target"
METADATA_KIND = "asuka.kind"

_BLOCK_KEY = re.compile(r"^(\d+)\.")
_MODULATION_KEY = re.compile(r"^\d+\.modulation\.lin\.(weight|bias)$")


# --------------------------------------------------------------------------------------
# What a state dict describes (shapes only: nothing is allocated here)


@dataclass(frozen=True)
class AlignerConfig:
    width: int
    depth: int
    target: str

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM


def expected_shapes(width: int, depth: int, *, modulation: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of an aligner of this width and depth, in the official order."""
    d = width
    shapes: dict[str, tuple[int, ...]] = {"0.weight": (d, MAE_WIDTH), "0.bias": (d,)}
    for b in range(1, depth + 1):
        shapes[f"{b}.linear1.weight"] = (7 * d, d)
        shapes[f"{b}.linear1.bias"] = (7 * d,)
        shapes[f"{b}.linear2.weight"] = (d, 5 * d)
        shapes[f"{b}.linear2.bias"] = (d,)
        shapes[f"{b}.norm.query_norm.scale"] = (HEAD_DIM,)
        shapes[f"{b}.norm.key_norm.scale"] = (HEAD_DIM,)
        if modulation:
            shapes[f"{b}.modulation.lin.weight"] = (3 * d, d)
            shapes[f"{b}.modulation.lin.bias"] = (3 * d,)
    shapes[f"{depth + 1}.weight"] = (d,)
    shapes[f"{depth + 1}.bias"] = (d,)
    return shapes


def aligner_config(tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str] | None = None) -> AlignerConfig:
    """Read width, depth and target from tensor shapes (and ``asuka.target`` metadata),
    checking that every tensor is where an aligner has it."""
    w0 = tensors.get("0.weight")
    if w0 is None or w0.ndim != 2 or w0.shape[1] != MAE_WIDTH:
        got = "missing" if w0 is None else f"shaped {list(w0.shape)}"
        raise CheckpointError(
            f"not an ASUKA aligner: its input layer '0.weight' should be [D, {MAE_WIDTH}] "
            f"(it maps the {MAE_WIDTH}-d MAE features), but it is {got}."
        )
    width = int(w0.shape[0])
    if width % HEAD_DIM:
        raise CheckpointError(
            f"aligner width {width} is not a multiple of the head size {HEAD_DIM}."
        )
    blocks = sorted({int(m.group(1)) for k in tensors if (m := _BLOCK_KEY.match(k)) and ".linear1." in k})
    depth = len(blocks)
    if depth == 0 or blocks != list(range(1, depth + 1)):
        raise CheckpointError(
            f"aligner blocks should be numbered 1..N with nothing missing; found {blocks or 'none'}."
        )
    expected = expected_shapes(width, depth, modulation=True)
    optional = {k for k in expected if _MODULATION_KEY.match(k)}
    problems = []
    for key, shape in expected.items():
        t = tensors.get(key)
        if t is None:
            if key not in optional:
                problems.append(f"'{key}' is missing")
        elif tuple(t.shape) != shape:
            problems.append(f"'{key}' is {list(t.shape)}, expected {list(shape)}")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        problems.append(f"unexpected tensors {', '.join(unexpected[:5])}{more}")
    if problems:
        raise CheckpointError(
            f"not a complete ASUKA aligner of width {width} and depth {depth}: "
            + "; ".join(problems[:6]) + "."
        )
    return AlignerConfig(width, depth, _target_for(width, metadata))


def _target_for(width: int, metadata: Mapping[str, str] | None) -> str:
    target = (metadata or {}).get(METADATA_TARGET)
    if target is not None:
        if target not in TARGETS:
            raise CheckpointError(
                f"its metadata says {METADATA_TARGET}='{target}'; known targets are "
                f"{', '.join(TARGETS)}."
            )
        if TARGET_WIDTHS[target] != width:
            raise CheckpointError(
                f"its metadata says it is for {TARGET_NAMES[target]}, which needs "
                f"{TARGET_WIDTHS[target]}-d tokens, but its width is {width}."
            )
        return target
    # Official files are pickled state dicts without metadata: tell them apart by width.
    if width == TARGET_WIDTHS[TARGET_FLUX_CLIP]:
        return TARGET_FLUX_CLIP
    if width == TARGET_WIDTHS[TARGET_FLUX_T5]:
        return TARGET_FLUX_T5
    raise CheckpointError(
        f"cannot tell what an aligner of width {width} is for (no '{METADATA_TARGET}' "
        "metadata). Save it with asuka_core.aligner.save_aligner(..., target=...)."
    )


# --------------------------------------------------------------------------------------
# The model


class _RMSNorm(nn.Module):
    """Per-head RMS normalisation: computed in float32, cast back, times a learned scale."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        # The product is taken at float32 and rounded once, as the reference does when its
        # scale is float32, and identically so when both are bf16/fp16.
        return normed.float() * self.scale.to(device=x.device, dtype=torch.float32)


class _QKNorm(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.query_norm = _RMSNorm(dim, dtype, device)
        self.key_norm = _RMSNorm(dim, dtype, device)


class AlignerBlock(nn.Module):
    """FLUX single-stream block without modulation (see the module docstring)."""

    def __init__(self, width: int, *, operations=None, dtype=None, device=None):
        super().__init__()
        ops = resolve_ops(operations)
        self.width = width
        self.heads = width // HEAD_DIM
        self.linear1 = ops.Linear(width, 7 * width, dtype=dtype, device=device)
        self.linear2 = ops.Linear(5 * width, width, dtype=dtype, device=device)
        self.norm = _QKNorm(HEAD_DIM, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        u = F.layer_norm(x, (d,), eps=1e-6)  # affine-free pre-norm: no parameters to cast
        qkv, mlp = self.linear1(u).split([3 * d, 4 * d], dim=-1)
        q, k, v = qkv.view(b, n, 3, self.heads, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.norm.query_norm(q).to(v.dtype)
        k = self.norm.key_norm(k).to(v.dtype)
        attn = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(64), no mask
        attn = attn.transpose(1, 2).reshape(b, n, d)
        return x + self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), dim=-1))


class Aligner(nn.Module):
    """MAE features ``[B, 256, 512]`` -> tokens ``[B, 256, width]`` for ``target``.

    Build one with :meth:`from_state_dict` or :func:`load_aligner`. The constructor makes
    an empty model (no initialisation); ``width`` is not checked against ``target`` here,
    only when a file is read or written.
    """

    def __init__(self, width: int, depth: int, target: str, *, operations=None,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if width <= 0 or width % HEAD_DIM:
            raise ValueError(f"width must be a positive multiple of {HEAD_DIM}, got {width}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.width, self.depth, self.target = width, depth, target
        self.compute_dtype: torch.dtype | None = None
        ops = resolve_ops(operations)
        # Built on the meta device, then given uninitialised storage: loading overwrites
        # every value, so random initialisation (1B parameters for D = 4096) is skipped.
        self.add_module("0", ops.Linear(MAE_WIDTH, width, dtype=dtype, device="meta"))
        for b in range(1, depth + 1):
            self.add_module(str(b), AlignerBlock(width, operations=operations, dtype=dtype, device="meta"))
        self.add_module(str(depth + 1), ops.LayerNorm(width, eps=1e-5, dtype=dtype, device="meta"))
        self.to_empty(device=device if device is not None else "cpu")

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM

    @property
    def config(self) -> AlignerConfig:
        return AlignerConfig(self.width, self.depth, self.target)

    def extra_repr(self) -> str:
        return f"width={self.width}, depth={self.depth}, heads={self.heads}, target={self.target!r}"

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None,
                        operations=None, dtype: torch.dtype | None = None, device=None) -> "Aligner":
        """Build from official or pack state dicts. ``dtype`` defaults to the dtype the
        weights are stored in; ``device`` to the CPU."""
        tensors = unwrap_state_dict(tensors)
        cfg = aligner_config(tensors, metadata)
        if dtype is None:
            stored = tensors["0.weight"].dtype
            dtype = stored if stored.is_floating_point and stored.itemsize >= 2 else torch.float32
        model = cls(cfg.width, cfg.depth, cfg.target, operations=operations, dtype=dtype, device=device)
        weights = {k: v for k, v in tensors.items() if not _MODULATION_KEY.match(k)}
        model.load_state_dict(weights, strict=True)
        return model.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = check_features(features)
        device, dtype = compute_device_dtype(self)
        x = _zero_non_finite(x).to(device=device, dtype=dtype)
        for i in range(self.depth + 2):
            x = self._modules[str(i)](x)
        return x.to(device=features.device, dtype=torch.float32)

    def conditioning(self, features: torch.Tensor, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positive, negative)``, each ``[B, 256, width]`` float32.

        ``negative`` is the output for all-zero MAE features ("no visible context", the
        official fallback feature); ``positive = negative + strength * (aligner(features)
        - negative)``: 1.0 is pure ASUKA conditioning, 0.0 the no-context tokens.
        """
        strength = finite_number("strength", strength)
        x = check_features(features)
        out = self(torch.cat((x, x.new_zeros(1, MAE_TOKENS, MAE_WIDTH)), dim=0))
        tokens, empty = out[:-1], out[-1:]
        negative = empty.expand_as(tokens).contiguous()
        positive = torch.lerp(negative, tokens, strength)  # exact at 0 and 1
        return positive, negative

    def expect_target(self, *targets: str, where: str = "This node") -> None:
        """Raise a CheckpointError when this aligner was not made for one of ``targets``."""
        if self.target in targets:
            return
        wanted = " or ".join(TARGET_NAMES[t] for t in targets)
        msg = f"{where} needs an aligner for {wanted}, but this one is for {TARGET_NAMES[self.target]}."
        if TARGET_SD15 in targets and self.target == TARGET_FLUX_CLIP:
            msg += (
                " The FLUX CLIP-branch aligner cannot condition SD1.5: it was trained only "
                "through the mean of its tokens (FLUX's pooled vector), so its individual "
                "tokens were never trained to mean anything. No SD1.5 aligner weights are "
                "public; see docs/aligner.md."
            )
        raise CheckpointError(msg)


def check_features(features) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise InputError(
            f"expected MAE features [B,{MAE_TOKENS},{MAE_WIDTH}] from ASUKA_MAEPrior, got "
            f"{type(features).__name__}."
        )
    if features.ndim != 3 or tuple(features.shape[1:]) != (MAE_TOKENS, MAE_WIDTH) or features.shape[0] == 0:
        raise InputError(
            f"expected MAE features [B,{MAE_TOKENS},{MAE_WIDTH}] from ASUKA_MAEPrior, got "
            f"{list(features.shape)}."
        )
    if not features.is_floating_point():
        features = features.float()
    return features


def _zero_non_finite(x: torch.Tensor) -> torch.Tensor:
    """The official pipeline replaces NaN MAE features by zeros (no visible context);
    done here per sample, so one bad image does not blank the rest of a batch."""
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    if bool(bad.any()):
        x = torch.where(bad[:, None, None], torch.zeros_like(x), x)
    return x


# --------------------------------------------------------------------------------------
# Files


_LOAD_HINT = (
    "Choose asuka_alignment_t5.pt or asuka_alignment_clip.pt (ASUKA-FLUX.1-Fill), or an "
    "SD1.5 aligner saved as .safetensors with asuka.target=sd15."
)


def load_aligner(source, *, operations=None, dtype: torch.dtype | None = None, device=None) -> Aligner:
    """Load an aligner from a file path, a :class:`Checkpoint`, or a state dict."""
    ckpt: Checkpoint = as_checkpoint(source)
    declared = ckpt.metadata.get(METADATA_KIND)
    if declared is not None and declared != "aligner":
        raise CheckpointError(
            f"load_aligner: '{ckpt.name}' says it holds a '{declared}' ({METADATA_KIND} metadata), "
            f"not an aligner. {_LOAD_HINT}"
        )
    expect_kind(ckpt, [KIND_ALIGNER], "load_aligner", _LOAD_HINT)
    try:
        return Aligner.from_state_dict(ckpt.tensors, metadata=ckpt.metadata, operations=operations,
                                       dtype=dtype, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"load_aligner: '{ckpt.name}': {e}") from None


def save_aligner(aligner_or_state_dict, path, *, target: str,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write an aligner as .safetensors with ``asuka.target`` / ``asuka.kind`` metadata.

    A state dict is written as given (the official unused ``modulation`` tensors included,
    if present); an :class:`Aligner` without them. ``metadata`` adds entries.
    """
    if target not in TARGETS:
        raise CheckpointError(f"save_aligner: target must be one of {', '.join(TARGETS)}, got {target!r}.")
    path = os.fspath(path)
    if not path.lower().endswith(SAFETENSORS_EXTENSIONS):
        raise CheckpointError(f"save_aligner: '{os.path.basename(path)}' should end in .safetensors.")
    if isinstance(aligner_or_state_dict, Aligner):
        tensors = aligner_or_state_dict.state_dict()
    else:
        tensors = unwrap_state_dict(aligner_or_state_dict)
    meta = {**dict(metadata or {}), METADATA_TARGET: target, METADATA_KIND: "aligner"}
    aligner_config(tensors, meta)  # same checks as loading: the file will load back
    save_safetensors(tensors, path, meta)
