"""The ASUKA MAE prior: a masked autoencoder (ViT) that turns an image with a hole into
256 context tokens of width 512, which the aligner maps to diffusion conditioning.

It is the Places2 MAE of MAE-FAR in its "Finetune" form, as used by the official ASUKA
code (GitHub ``Yikai-Wang/asuka-misato``, ``asuka-flux/MAE``); see
``docs/mae.md`` for the user-facing description. In short:

1. the image is rounded to uint8 and squashed to 256x256 with OpenCV's INTER_AREA, the
   mask with OpenCV's INTER_NEAREST (exact re-implementations in ``asuka_core.resize``);
2. ImageNet normalisation, hole pixels (mask >= 0.5) set to 0;
3. the ViT encoder runs on all 256 patches, but no patch that contains any hole pixel
   may be attended to (key masking);
4. the decoder replaces those patches' tokens with the learned mask token, blends a
   direct embedding of the visible pixels into partially covered patches, and runs;
   the feature is its residual stream after the 6th decoder block.

Only what loads from the file is built, and every built tensor comes from the file, so
ComfyUI's non-initialising layer classes (``operations``) can be used as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import KIND_MAE, as_checkpoint, expect_kind
from .errors import CheckpointError
from .imaging import prepare_image_and_mask
from .resize import area_resize_uint8, nearest_resize_cv
from .runtime import Progress, compute_device_dtype, layer_norm, report, residual_dtype, resolve_ops

MAE_SIZE = 256
"""Side of the square the official code squashes every image to."""
PATCH = 16
"""The only patch size the Finetune model works with (its partial-patch grid is hard-coded 16x16)."""
GRID = MAE_SIZE // PATCH
TOKENS = GRID * GRID
FEATURE_BLOCKS = 6
"""The feature is the decoder's residual stream after this many blocks (official ``decoder_layer=6``)."""
HOLE_PIXEL_THRESHOLD = 0.5
"""Pixels with mask >= this are blanked in the MAE input (official ``x * (mask < 0.5)``)."""
LAYER_NORM_EPS = 1e-6
MLP_RATIO = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Heads are not stored in the file; these follow the official arch table
# (ViT-B 768 -> 12, ViT-L 1024 -> 16, ViT-H 1280 -> 16, decoder 512 -> 16).
_ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}
_DECODER_HEADS = {512: 16}

_HINT = ("Choose the ASUKA MAE file (mae_300.pth from the yikaiwang/ASUKA-FLUX.1-Fill release, "
         "or a safetensors copy of it) in the MAE loader.")


# --------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class MAEConfig:
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    patch_size: int = PATCH
    img_size: int = MAE_SIZE
    has_partial_branch: bool = False

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def arch_name(self) -> str:
        names = {(768, 12): "ViT-B/16", (1024, 24): "ViT-L/16", (1280, 32): "ViT-H"}
        return names.get((self.embed_dim, self.depth), f"ViT {self.embed_dim}-d x {self.depth}")


def _block_count(keys: set[str], prefix: str, name: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in keys
             if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"The MAE file's {name} blocks are missing or not numbered 0..N-1 "
                              f"(found {sorted(found)}). {_HINT}")
    return len(found)


def _heads(dim: int, table: dict[int, int], head_dim: int, name: str) -> int:
    heads = table.get(dim, dim // head_dim)
    if heads < 1 or dim % heads:
        raise CheckpointError(f"The MAE file's {name} width {dim} does not split into attention "
                              f"heads (official convention: {head_dim} channels per head). {_HINT}")
    return heads


def infer_config(tensors: Mapping[str, torch.Tensor]) -> MAEConfig:
    """Read the architecture from tensor names and shapes (works on meta tensors too)."""
    keys = set(tensors)
    for key in ("patch_embed.proj.weight", "decoder_embed.weight"):
        if key not in keys:
            raise CheckpointError(f"Not an MAE state dict: '{key}' is missing. {_HINT}")
    proj = tensors["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"The MAE patch embedding has shape {list(proj.shape)}; expected "
                              f"[dim, 3, 16, 16]. {_HINT}")
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[2])
    if patch != PATCH:
        raise CheckpointError(
            f"This MAE uses {patch}x{patch} patches; only 16x16 is supported, because the "
            f"official model works on a fixed 16x16 grid of a 256x256 image (ViT-H/14 does not "
            f"fit it). {_HINT}")
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in tensors and tensors[key].shape[-2] != TOKENS:
            raise CheckpointError(
                f"The MAE '{key}' has {tensors[key].shape[-2]} positions; the official model has "
                f"{TOKENS} (a 16x16 grid at 256x256). {_HINT}")
    decoder_dim = int(tensors["decoder_embed.weight"].shape[0])
    depth = _block_count(keys, "blocks.", "encoder")
    decoder_depth = _block_count(keys, "decoder_blocks.", "decoder")
    if decoder_depth < FEATURE_BLOCKS:
        raise CheckpointError(
            f"The MAE decoder has {decoder_depth} blocks; ASUKA reads its feature after block "
            f"{FEATURE_BLOCKS}, so at least {FEATURE_BLOCKS} are needed. {_HINT}")
    return MAEConfig(
        embed_dim=embed_dim, depth=depth,
        num_heads=_heads(embed_dim, _ENCODER_HEADS, 64, "encoder"),
        decoder_dim=decoder_dim, decoder_depth=decoder_depth,
        decoder_heads=_heads(decoder_dim, _DECODER_HEADS, 32, "decoder"),
        patch_size=patch, img_size=MAE_SIZE,
        has_partial_branch="decoder_patch_embed.proj.weight" in keys,
    )


def sincos_pos_embed(dim: int, grid: int = GRID) -> torch.Tensor:
    """The official fixed 2-D sin-cos table ``[1, grid*grid, dim]`` (no class token).

    Token t = grid*row + col. With K = dim/4 and w_k = 10000^(-k/K), the channels are
    [sin(col*w), cos(col*w), sin(row*w), cos(row*w)], computed in float64 as the official
    numpy code does, stored as float32.
    """
    if dim % 4:
        raise CheckpointError(f"Cannot build a 2-D sin-cos position table of width {dim} (not a multiple of 4).")
    k = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(k, dtype=torch.float64) / k)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    col_angles = cols.reshape(-1, 1) * omega
    row_angles = rows.reshape(-1, 1) * omega
    table = torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1)
    return table.float().unsqueeze(0)


# --------------------------------------------------------------------------------------
# Layers (key names follow the official timm-based model)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution, flattened row-major to tokens."""

    def __init__(self, in_channels: int, dim: int, patch: int, ops):
        super().__init__()
        self.proj = ops.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, ops):
        super().__init__()
        self.fc1 = ops.Linear(dim, dim * MLP_RATIO)
        self.fc2 = ops.Linear(dim * MLP_RATIO, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, ops):
        super().__init__()
        self.heads = heads
        self.qkv = ops.Linear(dim, dim * 3)
        self.proj = ops.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``key_allowed``: bool ``[B, 1, 1, N]``, False = no query may look at that token."""
        b, n, c = x.shape
        # qkv output layout: (q | k | v), each head-major.
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_allowed)  # scale = head_dim^-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, ops):
        super().__init__()
        self.norm1 = ops.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, heads, ops)
        self.norm2 = ops.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, ops)

    def forward(self, x: torch.Tensor, key_allowed: Optional[torch.Tensor] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``x`` is the residual stream; the layers compute in ``dtype`` (default: ``x``'s)."""
        dtype = dtype or x.dtype
        x = x + self.attn(layer_norm(self.norm1, x).to(dtype), key_allowed).to(x.dtype)
        return x + self.mlp(layer_norm(self.norm2, x).to(dtype)).to(x.dtype)


# --------------------------------------------------------------------------------------
# Input preparation


def _normalisation_table() -> torch.Tensor:
    """``[3, 256]``: ImageNet-normalised value of each uint8 level per channel, computed in
    float64 then rounded to float32 exactly like the official numpy code. A lookup table
    keeps float64 off the compute device (MPS has none)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1)
    return ((levels - mean) / std).float()


_NORMALISE = _normalisation_table()


def preprocess(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI IMAGE ``[B,H,W,3]`` 0..1 and MASK ``[B,H,W]`` (same size, 1 = hole) ->
    the official MAE inputs at 256x256: the normalised image with hole pixels zeroed
    ``[B,3,256,256]`` and the raw (unthresholded) mask ``[B,1,256,256]``, both float32."""
    levels = (image * 255.0).round().clamp(0, 255).to(torch.uint8).movedim(-1, 1).contiguous()
    levels = area_resize_uint8(levels, (MAE_SIZE, MAE_SIZE)).long()
    table = _NORMALISE.to(image.device)
    pixels = torch.stack([table[c][levels[:, c]] for c in range(3)], dim=1)
    mask256 = nearest_resize_cv(mask.float().unsqueeze(1), (MAE_SIZE, MAE_SIZE))
    pixels = torch.where(mask256 >= HOLE_PIXEL_THRESHOLD, torch.zeros_like(pixels), pixels)
    return pixels, mask256


def patch_rules(mask256: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch classes from the raw 256x256 mask ``[B,1,256,256]``: ``(hole, partial)``,
    bool ``[B, 256]`` in row-major token order.

    f = the mean of the mask over each 16x16 patch; hole = f > 0 (any hole pixel, even a
    faint one), partial = 0 < f < 1. The official pipeline evaluates this on the mask in
    its compute dtype (bf16), so the mean is taken on the mask rounded to ``dtype`` and
    rounded back to ``dtype``, as an area-interpolate in that dtype does.
    """
    rounded = mask256.to(dtype).float()
    f = F.avg_pool2d(rounded, kernel_size=PATCH).to(dtype).flatten(1)
    hole = f > 0
    return hole, hole & (f < 1)


# --------------------------------------------------------------------------------------
# Model


@dataclass
class MAEPrior:
    """What the MAE gives the rest of the pipeline."""

    features: torch.Tensor        # [B, 256, 512] float32, residual stream after decoder block 6 (zeros if fully masked)
    reconstruction: torch.Tensor  # [B, H, W, 3] float32 0..1, the MAE's own image estimate at the input size
    patch_mask: torch.Tensor      # [B, 256] bool, True = the patch has a hole pixel
    fully_masked: torch.Tensor    # [B] bool, True = every patch has a hole pixel

    def to(self, device) -> "MAEPrior":
        return MAEPrior(self.features.to(device), self.reconstruction.to(device),
                        self.patch_mask.to(device), self.fully_masked.to(device))


@dataclass
class _Outputs:
    features: torch.Tensor      # [B, 256, Dd] float32
    reconstruction: torch.Tensor  # [B, 3, 256, 256] float32 0..1
    hole: torch.Tensor          # [B, 256] bool
    fully_masked: torch.Tensor  # [B] bool


class MAE(nn.Module):
    """The MAE prior. Build it with ``load_mae`` or ``MAE.from_state_dict``: the
    constructor alone leaves every tensor uninitialised (they all come from the file)."""

    compute_dtype: Optional[torch.dtype] = None
    compute_device: Optional[torch.device] = None

    def __init__(self, config: MAEConfig, operations=None):
        super().__init__()
        ops = resolve_ops(operations)
        c = self.config = config
        self.compute_dtype = None
        self.ignored_keys: tuple[str, ...] = ()
        self.patch_embed = PatchEmbed(3, c.embed_dim, c.patch_size, ops)
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, ops) for _ in range(c.depth))
        self.norm = ops.LayerNorm(c.embed_dim, eps=LAYER_NORM_EPS)
        self.decoder_embed = ops.Linear(c.embed_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.empty(1, 1, c.decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(c.decoder_dim, c.decoder_heads, ops)
                                            for _ in range(c.decoder_depth))
        self.decoder_norm = ops.LayerNorm(c.decoder_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = ops.Linear(c.decoder_dim, c.patch_size ** 2 * 3)
        tokens = c.grid ** 2
        self.register_buffer("pos_embed", torch.empty(1, tokens, c.embed_dim))
        self.register_buffer("decoder_pos_embed", torch.empty(1, tokens, c.decoder_dim))
        if c.has_partial_branch:
            self.decoder_patch_embed = PatchEmbed(4, c.decoder_dim, c.patch_size, ops)
            self.register_buffer("alpha", torch.empty(()))

    # ---- loading -------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], *, operations=None,
                        dtype: Optional[torch.dtype] = None, device=None) -> "MAE":
        """Build the architecture the tensors describe and load them (shapes checked).

        Keys the model does not use are ignored (listed in ``ignored_keys``). Missing
        position tables are recomputed; a missing ``alpha`` next to a present
        ``decoder_patch_embed`` is 1 (the official initial value: branch off).
        """
        config = infer_config(tensors)
        with torch.device("meta"):
            model = cls(config, operations)
        wanted = model.state_dict()
        if dtype is None:
            stored = tensors["patch_embed.proj.weight"].dtype
            dtype = stored if stored.is_floating_point else torch.float32
        full = {k: v for k, v in tensors.items() if k in wanted}
        full.setdefault("pos_embed", sincos_pos_embed(config.embed_dim, config.grid))
        full.setdefault("decoder_pos_embed", sincos_pos_embed(config.decoder_dim, config.grid))
        if config.has_partial_branch:
            full.setdefault("alpha", torch.tensor(1.0))
        missing = sorted(set(wanted) - set(full))
        if missing:
            raise CheckpointError(
                f"The MAE file is incomplete: {len(missing)} tensors are missing "
                f"(e.g. {', '.join(missing[:4])}). Download it again. {_HINT}")
        wrong = [f"{k} {list(full[k].shape)} (expected {list(w.shape)})"
                 for k, w in wanted.items() if full[k].shape != w.shape]
        if wrong:
            raise CheckpointError(
                f"The MAE file does not match a {config.arch_name} MAE: {', '.join(wrong[:4])}. {_HINT}")
        full = {k: v.to(device=device if device is not None else v.device,
                        dtype=dtype if v.is_floating_point() else v.dtype)
                for k, v in full.items()}
        model.load_state_dict(full, strict=True, assign=True)
        model.ignored_keys = tuple(sorted(set(tensors) - set(wanted)))
        return model.eval().requires_grad_(False)

    # ---- forward -------------------------------------------------------------------

    @property
    def partial_alpha(self) -> Optional[float]:
        """clamp(alpha, 0, 1), or None when the partial-patch branch is absent or off (alpha >= 1)."""
        if not self.config.has_partial_branch:
            return None
        a = float(self.alpha.float().clamp(0.0, 1.0))
        return None if a >= 1.0 else a

    def forward_prepared(self, pixels: torch.Tensor, mask256: torch.Tensor) -> _Outputs:
        """Run on official-format inputs (see ``preprocess``), any batch size."""
        _, dtype = compute_device_dtype(self)
        features, y, hole, fully = self._features(pixels, mask256)
        for blk in self.decoder_blocks[FEATURE_BLOCKS:]:
            y = blk(y, dtype=dtype)
        image = self._unpatchify(self.decoder_pred(layer_norm(self.decoder_norm, y).to(dtype)).float())
        mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return _Outputs(features, (image * std + mean).clamp(0.0, 1.0), hole, fully)

    def features_prepared(self, pixels: torch.Tensor, mask256: torch.Tensor) -> torch.Tensor:
        """Only the prior features ``[B, 256, 512]`` float32 from official-format inputs
        (the decoder blocks after the feature and the reconstruction are skipped)."""
        return self._features(pixels, mask256)[0]

    def _features(self, pixels: torch.Tensor, mask256: torch.Tensor):
        _, dtype = compute_device_dtype(self)
        hole, partial = patch_rules(mask256, dtype)
        fully = hole.all(dim=1)
        x = pixels.to(dtype)
        m = mask256.to(dtype)

        latent = self._encode(x, hole, fully, dtype)
        y = self._decoder_input(latent, x, m, hole, partial, dtype)
        for blk in self.decoder_blocks[:FEATURE_BLOCKS]:
            y = blk(y, dtype=dtype)
        # The official encoder yields NaN when no patch is visible and the caller then
        # replaces the feature with zeros; here that is done per image, without NaN.
        features = torch.where(fully[:, None, None], torch.zeros_like(y), y).float()
        return features, y, hole, fully

    def _encode(self, x: torch.Tensor, hole: torch.Tensor, fully: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        # Root tensors (position tables, mask token, alpha) are not in any layer: under
        # partial loading they stay on the offload device, so they follow the activations.
        # The residual stream is float32 when computing in float16 (see residual_dtype).
        stream = residual_dtype(dtype)
        tokens = self.patch_embed(x).to(stream)
        tokens = tokens + self.pos_embed.to(device=tokens.device, dtype=stream)
        # Every query may only read patches without hole pixels. A fully masked image has
        # no such patch; its encoder output is never used (all its decoder tokens become
        # mask tokens), so it attends everywhere instead of producing NaN.
        key_allowed = (~hole | fully[:, None])[:, None, None, :]
        for blk in self.blocks:
            tokens = blk(tokens, key_allowed, dtype)
        return layer_norm(self.norm, tokens).to(dtype)

    def _decoder_input(self, latent: torch.Tensor, x: torch.Tensor, m: torch.Tensor,
                       hole: torch.Tensor, partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        stream = residual_dtype(dtype)
        y = self.decoder_embed(latent).to(stream)
        # Hole patches get the mask token; `where` (not a convex mix) so nothing computed
        # for them upstream, even NaN, can reach the decoder.
        y = torch.where(hole[..., None], self.mask_token.to(device=y.device, dtype=stream), y)
        if self.partial_alpha is not None:
            # Partially covered patches also see their visible pixels, embedded directly.
            # (Computed for every patch and selected: no host sync on the mask.)
            visible = self.decoder_patch_embed(torch.cat([x * (1 - m), m], dim=1)).to(stream)
            a_t = self.alpha.to(device=y.device, dtype=stream).clamp(0.0, 1.0)
            y = torch.where(partial[..., None], a_t * y + (1 - a_t) * visible, y)
        return y + self.decoder_pos_embed.to(device=y.device, dtype=stream)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, g*g, p*p*3]`` (each token ordered row-in-patch, col-in-patch, channel)
        -> ``[B, 3, g*p, g*p]``."""
        b, g, p = tokens.shape[0], self.config.grid, self.config.patch_size
        return tokens.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)

    # ---- public entry point --------------------------------------------------------

    @torch.no_grad()
    def encode(self, image: torch.Tensor, mask: torch.Tensor, *, progress: Progress = None,
               batch_size: int = 4) -> MAEPrior:
        """ComfyUI IMAGE ``[B,H,W,3]`` 0..1 and MASK ``[B,H,W]`` (1 = hole; one mask may
        serve many images) -> ``MAEPrior`` on the model's device."""
        image, mask = prepare_image_and_mask(image, mask)
        device, _ = compute_device_dtype(self)
        total, height, width = image.shape[0], image.shape[1], image.shape[2]
        step = max(1, int(batch_size))
        parts: list[_Outputs] = []
        for start in range(0, total, step):
            pixels, mask256 = preprocess(image[start:start + step].to(device), mask[start:start + step].to(device))
            out = self.forward_prepared(pixels, mask256)
            out.reconstruction = _to_input_size(out.reconstruction, height, width)
            parts.append(out)
            report(progress, min(start + step, total), total)
        return MAEPrior(
            features=torch.cat([p.features for p in parts]),
            reconstruction=torch.cat([p.reconstruction for p in parts]),
            patch_mask=torch.cat([p.hole for p in parts]),
            fully_masked=torch.cat([p.fully_masked for p in parts]),
        )


def _to_input_size(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B,3,256,256]`` -> IMAGE ``[B,H,W,3]``, bilinear (antialiased when shrinking)."""
    if (height, width) != tuple(image.shape[-2:]):
        shrink = height < image.shape[-2] or width < image.shape[-1]
        image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False,
                              antialias=shrink).clamp(0.0, 1.0)
    return image.movedim(1, -1).contiguous()


def load_mae(source, *, operations=None, dtype: Optional[torch.dtype] = None, device=None) -> MAE:
    """Load an MAE prior from a path (``.pth`` as released, ``.safetensors``), a
    ``Checkpoint`` or a state dict; returns the model in eval mode."""
    ckpt = as_checkpoint(source)
    expect_kind(ckpt, [KIND_MAE], "MAE loader", _HINT)
    try:
        return MAE.from_state_dict(ckpt.tensors, operations=operations, dtype=dtype, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"'{ckpt.name}': {e}") from None
