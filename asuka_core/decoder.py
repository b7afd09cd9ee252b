"""Masked (conditional) VAE decoders: ASUKA's and Asymmetric VQGAN's.

Both decoders are a stock ldm VAE decoder (conv_in, mid ResNet/attention/ResNet, up
levels of ResNets with nearest x2 upsampling, GroupNorm/swish/conv_out) plus a small
*condition encoder* that reads the known pixels. Before every up level, the cells
outside the hole take the condition encoder's feature of the same shape instead of the
generated one; a last replacement happens at full resolution with the raw mask. That is
what keeps colours and texture of the unmasked region faithful without pasting pixels.

Two families, chosen by the file (``MaskedDecoder.kind``):

``"asuka"``  ASUKA-FLUX conditional decoder (arXiv 2312.04831): condition input is the
             masked image and the mask (4 channels); per-level mask = area-average of the
             mask to the level's size, then every cell touching the hole counts as hole
             (> 0); no post-quant conv (FLUX latents, 16 channels).
``"avq"``    Asymmetric VQGAN (arXiv 2306.04632; diffusers ``AsymmetricAutoencoderKL``):
             condition input is the masked image only (3 channels); per-level mask =
             nearest resize; ``post_quant_conv`` applied to the latent first (SD latents,
             4 channels).

Internal parameter names are the ldm (ComfyUI-native) decoder names without the
``decoder.`` prefix, except that the condition encoder is ``condition_encoder.layers.N``
(ldm: ``encoder.layers.N``) and the mid attention projections are 2-D linear weights.
``post_quant_conv.*`` sits at the top level when present.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_mod
from .errors import CheckpointError, InputError
from .imaging import image_to_model, model_to_image, prepare_image_and_mask
from .runtime import Progress, compute_device_dtype, report, resolve_ops
from .tiling import Tile, decode_tiled, hole_regions, region_share, tile_grid

log = logging.getLogger("comfyui-asuka")

KIND_ASUKA = "asuka"
KIND_AVQ = "avq"

GROUPS = 32
EPS = 1e-6

# Region decoding (``MaskedDecoder.decode(region=...)``).
REGION_FULL, REGION_HOLE, REGION_AUTO = "full", "hole", "auto"
REGION_MODES = (REGION_AUTO, REGION_FULL, REGION_HOLE)
REGION_AUTO_MAX_SHARE = 0.5  # "auto" decodes the region only when it is at most half the picture

_LOADER = "Load masked decoder"
_HINT = (
    "Pick the ASUKA decoder (asuka_decoder.ckpt from yikaiwang/ASUKA-FLUX.1-Fill) for FLUX "
    "latents, or an Asymmetric VQGAN decoder (original .ckpt, or diffusers "
    "cross-attention/asymmetric-autoencoder-kl-x-1-5 / x-2) for SD1.5 latents."
)


# --------------------------------------------------------------------------------------
# Architecture description (read from tensors, never from a config file)


@dataclass(frozen=True)
class CondLayer:
    """One condition-encoder conv: 3x3 stride 1 or 4x4 stride 2, padding 1."""

    in_channels: int
    out_channels: int
    kernel: int

    @property
    def stride(self) -> int:
        return 1 if self.kernel == 3 else 2


@dataclass(frozen=True)
class DecoderConfig:
    kind: str                          # KIND_ASUKA or KIND_AVQ
    latent_channels: int
    mid_channels: int
    widths: tuple[int, ...]            # output width of ldm level 0 (full res) .. L-1 (lowest res)
    blocks: tuple[int, ...]            # ResNets per ldm level
    cond_layers: tuple[CondLayer, ...]
    out_channels: int                  # 3 (RGB)
    post_quant_conv: bool

    @property
    def levels(self) -> int:
        return len(self.widths)

    @property
    def scale(self) -> int:
        """Pixels per latent cell along each side (8 for every released model)."""
        return 2 ** (self.levels - 1)

    @property
    def reach_up_px(self) -> int:
        """How far (pixels) an output pixel can see through the local operations after the
        mid block (up levels, final fusion, conv_out, condition encoder), counted from the
        architecture: a 3x3 convolution reaches one cell of its input, a 4x4 stride-2 one two
        cells; a cell at level l is 2**l pixels. The main path and the condition encoder are
        added (an upper bound), plus one latent cell for alignment. GroupNorm statistics are
        global and not counted. This is the margin a region needs when the latent-resolution
        stages (``MaskedDecoder.latent_stage``) ran on the whole latent."""
        levels = self.levels
        main = 0
        for lv in reversed(range(levels)):
            main += 2 * self.blocks[lv] * 2 ** lv          # ResNets: 2 convs each
            if lv:
                main += 2 ** (lv - 1)                       # upsample conv, at the next level
        main += 1                                           # conv_out
        cond, cell = 0, 1
        for layer in self.cond_layers:
            cond += (1 if layer.kernel == 3 else 2) * cell
            cell *= layer.stride
        return main + cond + self.scale

    @property
    def reach_px(self) -> int:
        """``reach_up_px`` plus the latent-resolution stages (conv_in and the mid block's two
        ResNets, five 3x3 convolutions on cells of ``scale`` pixels): how far an output pixel
        sees through the whole decoder's local operations. The mid attention is global and
        not counted."""
        return self.reach_up_px + (1 + 4) * self.scale

    @property
    def reach_cells(self) -> int:
        """``reach_px`` in latent cells, rounded up."""
        return -(-self.reach_px // self.scale)

    @property
    def reach_up_cells(self) -> int:
        """``reach_up_px`` in latent cells, rounded up."""
        return -(-self.reach_up_px // self.scale)

    def level_input_channels(self, level: int) -> int:
        """Width of ``h`` entering ldm level ``level`` (before its fusion and ResNets)."""
        return self.mid_channels if level == self.levels - 1 else self.widths[level + 1]

    def fusion_plan(self) -> tuple[tuple[int, ...], int]:
        """Which condition-encoder output is fused where.

        The official code stores every encoder output in a dict keyed by its full shape and
        looks up the shape of ``h``; a later layer with the same shape overwrites an earlier
        one. Since shapes are (batch, channels, H/f, W/f), the lookup is decided by
        (channels, f) alone, so it is resolved once here instead of per call.
        Returns (encoder layer per ldm level, encoder layer for the final full-res fusion).
        """
        by_shape: dict[tuple[int, int], int] = {}
        factor = 1
        for i, layer in enumerate(self.cond_layers):
            factor *= layer.stride
            by_shape[(layer.out_channels, factor)] = i

        def find(channels: int, factor: int, where: str) -> int:
            try:
                return by_shape[(channels, factor)]
            except KeyError:
                raise CheckpointError(
                    f"{_LOADER}: the condition encoder has no output with {channels} channels at "
                    f"1/{factor} resolution, which {where} needs. The file is not a masked decoder "
                    "this pack understands (or it is damaged)."
                ) from None

        per_level = tuple(
            find(self.level_input_channels(lv), 2 ** lv, f"up level {lv}") for lv in range(self.levels)
        )
        final = find(self.widths[0], 1, "the final full-resolution fusion")
        return per_level, final


# --------------------------------------------------------------------------------------
# Building blocks


def _group_norm(ops, channels: int) -> nn.Module:
    return ops.GroupNorm(GROUPS, channels, eps=EPS, affine=True)


def _norm_swish(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # GroupNorm accumulates its statistics in float32 even for half inputs (PyTorch's
    # kernels use a float accumulator), so no explicit upcast is needed here.
    return F.silu(norm(x), inplace=True)


def _upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2. The official code casts to float32 first because old PyTorch had no
    bfloat16 kernel; nearest-neighbour copying is exact in every dtype, so interpolating in
    the tensor's own dtype is bit-identical and saves a full-size float32 temporary
    (checked in tests/unit/test_decoder.py)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def fuse(generated: torch.Tensor, known: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The masked decoders' one fusion rule, ``generated * hole + known * (1 - hole)``: hole
    cells keep the generated feature, known cells take the condition encoder's feature.
    ``hole`` may be soft (final fusion). Accumulated in place to hold one temporary, not three."""
    return (generated * hole).addcmul_(known, 1 - hole)


class ResnetBlock(nn.Module):
    """ldm ResnetBlock without time embedding: GN-swish-conv twice, 1x1 shortcut on width change."""

    def __init__(self, ops, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _group_norm(ops, c_in)
        self.conv1 = ops.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _group_norm(ops, c_out)
        self.conv2 = ops.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = ops.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One operation per statement so that each intermediate is freed as soon as the
        # next one exists (this is the full-resolution memory peak).
        h = self.conv1(_norm_swish(self.norm1, x))
        h = _norm_swish(self.norm2, h)
        h = self.conv2(h)
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (the decoder's mid attention)."""

    def __init__(self, ops, channels: int):
        super().__init__()
        self.norm = _group_norm(ops, channels)
        # 1x1 convs in ldm files, linear layers in diffusers files: same maths, stored 2-D.
        self.q = ops.Linear(channels, channels)
        self.k = ops.Linear(channels, channels)
        self.v = ops.Linear(channels, channels)
        self.proj_out = ops.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)          # [B, N, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.q, self.k, self.v))
        # Default scale 1/sqrt(C): single head, so the head dim is the full width.
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.proj_out(attended).transpose(1, 2).reshape(b, c, height, width)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, ops, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(ops, channels, channels)
        self.attn_1 = AttnBlock(ops, channels)
        self.block_2 = ResnetBlock(ops, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Upsample(nn.Module):
    def __init__(self, ops, channels: int):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_upsample_nearest(x))


class UpLevel(nn.Module):
    """ResNets then (except at full resolution) an upsample; run by ``MaskedDecoder.forward``."""

    def __init__(self, ops, c_in: int, c_out: int, n_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(ops, c_in if j == 0 else c_out, c_out) for j in range(n_blocks)
        )
        self.upsample = Upsample(ops, c_out) if upsample else None

    def steps(self) -> list[nn.Module]:
        return [*self.block, *([self.upsample] if self.upsample is not None else [])]


class ConditionEncoder(nn.Module):
    """Plain conv stack over the masked image; ReLU between layers, outputs kept pre-ReLU."""

    def __init__(self, ops, layers: tuple[CondLayer, ...]):
        super().__init__()
        self.layers = nn.ModuleList(
            ops.Conv2d(s.in_channels, s.out_channels, s.kernel, stride=s.stride, padding=1) for s in layers
        )

    def forward(self, x: torch.Tensor, keep: frozenset[int]) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        last = max(keep)          # later layers would only be computed to be thrown away
        for i, layer in enumerate(self.layers[: last + 1]):
            x = layer(x)
            if i in keep:
                out[i] = x
            if i < last:
                x = F.relu(x)     # not in place: the stored feature is the pre-ReLU one
        return out


# --------------------------------------------------------------------------------------
# The decoder


class MaskedDecoder(nn.Module):
    """A masked decoder ready to run; build it with ``load_decoder`` or ``from_state_dict``."""

    kind: str
    latent_channels: int
    compute_dtype: torch.dtype | None
    compute_device: torch.device | None = None
    ignored_keys: tuple[str, ...] = ()
    """Weights of the file the decoder does not use (besides the known unused deconvs)."""

    def __init__(self, config: DecoderConfig, *, operations=None):
        super().__init__()
        ops = resolve_ops(operations)
        self.config = config
        self.kind = config.kind
        self.latent_channels = config.latent_channels
        self.compute_dtype = None
        self._plan, self._final = config.fusion_plan()
        self._keep = frozenset((*self._plan, self._final))

        c = config.latent_channels
        self.post_quant_conv = ops.Conv2d(c, c, 1) if config.post_quant_conv else None
        self.conv_in = ops.Conv2d(c, config.mid_channels, 3, padding=1)
        self.mid = MidBlock(ops, config.mid_channels)
        self.up = nn.ModuleList(
            UpLevel(ops, config.level_input_channels(lv), config.widths[lv], config.blocks[lv], upsample=lv != 0)
            for lv in range(config.levels)
        )
        self.condition_encoder = ConditionEncoder(ops, config.cond_layers)
        self.norm_out = _group_norm(ops, config.widths[0])
        self.conv_out = ops.Conv2d(config.widths[0], config.out_channels, 3, padding=1)

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, tensors, *, operations=None, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "MaskedDecoder":
        """Build from any supported state dict (or ``Checkpoint``). ``dtype`` is the
        parameter dtype (default float32); ``device`` defaults to CPU."""
        ckpt = ckpt_mod.as_checkpoint(tensors)
        weights = canonical_weights(ckpt)
        config = infer_config(weights)
        # Built on the meta device: no memory and no initialisation for weights that the
        # file replaces anyway (ComfyUI's manual_cast layers skip init too).
        with torch.device("meta"):
            model = cls(config, operations=operations)
        dtype = dtype or torch.float32
        device = torch.device(device or "cpu")
        weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        _load_strict(model, weights, ckpt.name)
        model.eval().requires_grad_(False)
        return model

    # ---- maths in model space --------------------------------------------------------

    def level_mask(self, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The hole mask at an up level's resolution (float32, same batch)."""
        mask = mask.float()
        if self.kind == KIND_ASUKA:
            # Area average, then any cell that touches the hole is hole (a dilated, binary mask).
            return (F.interpolate(mask, size=size, mode="area") > 0).float()
        return F.interpolate(mask, size=size, mode="nearest")

    def condition_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        masked = (1 - mask) * image
        return torch.cat([masked, mask], dim=1) if self.kind == KIND_ASUKA else masked

    @property
    def stages(self) -> int:
        """How many times ``forward`` calls its ``stage`` callback: after the mid block and
        after each up level."""
        return self.config.levels + 1

    def latent_stage(self, z: torch.Tensor) -> torch.Tensor:
        """The stages at latent resolution: post_quant_conv (when present), conv_in and the
        mid block (ResNet, self-attention, ResNet). ``z`` [B,C,h,w] raw latent; returns
        [B,mid_channels,h,w], the input of ``up_path``."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.mid(self.conv_in(z))

    def up_path(self, h: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                stage: Callable[[], None] | None = None) -> torch.Tensor:
        """The up levels with their fusions, the final fusion and conv_out, from the output of
        ``latent_stage`` (``h`` [B,mid_channels,h,w]) and the matching ``image``/``mask``
        (as in ``forward``). ``stage()`` is called after each up level."""
        stage = stage or (lambda: None)
        features = self.condition_encoder(self.condition_input(image, mask), self._keep)
        uses = [*(self._plan[lv] for lv in reversed(range(self.config.levels))), self._final]

        def take(index: int) -> torch.Tensor:
            # Drop each feature after its last use: the full-resolution ones are the
            # largest tensors alive during the up path.
            uses.remove(index)
            return features[index] if index in uses else features.pop(index)

        for level in reversed(range(self.config.levels)):
            hole = self.level_mask(mask, h.shape[-2:]).to(h.dtype)
            h = fuse(h, take(self._plan[level]), hole)
            for step in self.up[level].steps():
                h = step(h)  # rebinding the single name frees each level input early
            stage()
        h = fuse(h, take(self._final), mask.to(h.dtype))
        h = _norm_swish(self.norm_out, h)
        return self.conv_out(h)

    def forward(self, z: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                stage: Callable[[], None] | None = None) -> torch.Tensor:
        """``z`` [B,C,h,w] raw VAE latent; ``image`` [B,3,H,W] in -1..1; ``mask`` [B,1,H,W],
        1 = hole. All in the compute dtype on the model's device. Returns [B,3,H,W], nominally
        -1..1, unclamped. ``stage()`` is called ``self.stages`` times on the way (progress;
        it may raise to cancel)."""
        stage = stage or (lambda: None)
        h = self.latent_stage(z)
        stage()
        return self.up_path(h, image, mask, stage)

    # ---- ComfyUI-facing entry point ----------------------------------------------------

    def decode(self, latent: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, *,
               tile_size: int | None = None, tile_overlap: int = 16, region: str = REGION_FULL,
               progress: Progress = None) -> torch.Tensor:
        """Decode a ComfyUI LATENT with the original IMAGE and MASK.

        ``latent`` [B,C,h,w] raw VAE latent (no scale/shift to undo); ``image`` [B,H,W,3]
        0..1, the full original; ``mask`` [B,H,W], 1 = hole. Returns IMAGE [B,H,W,3] float32
        0..1 on the image's device: the decoder's own output, nothing pasted.
        ``tile_size`` (latent cells) decodes overlapping tiles blended with feathered weights.
        ``region``: ``"full"`` decodes the whole picture; ``"hole"`` runs the latent-resolution
        stages (``latent_stage``: conv_in, mid block) on the whole latent, then the up path
        only on the boxes of ``decode_boxes`` (the hole's cells grown by
        ``config.reach_up_cells``), and returns the original image everywhere else, for
        callers that paste the original back outside the hole; ``"auto"`` is ``"hole"`` when the boxes cover at most ``REGION_AUTO_MAX_SHARE``
        of the picture, else ``"full"``. Decided per sample.
        """
        if region not in REGION_MODES:
            raise InputError(f"region must be one of {', '.join(REGION_MODES)}; got {region!r}.")
        latent, image, mask = self._validate(latent, image, mask)
        if self.kind == KIND_AVQ:
            # The Asymmetric VQGAN decoders were trained on binary masks, and both their own
            # inference script and diffusers' inpainting pipeline threshold at 0.5 before
            # decoding; the ASUKA decoder is used with the raw (possibly soft) mask.
            mask = (mask >= 0.5).to(mask.dtype)
        out_device = image.device
        device, dtype = compute_device_dtype(self)
        batch, _, lh, lw = latent.shape
        whole_box = [Tile(0, 0, lh, lw)]
        plans = [[(box, tile_grid(box.height, box.width, tile_size, tile_overlap))
                  for box in self.decode_boxes(mask[i], lh, lw, region)] for i in range(batch)]
        # Progress: per tile, or (untiled) per stage of the forward pass, so that a single
        # large decode still reports and can be cancelled part-way. A region decode runs the
        # latent-resolution stages once on the whole latent (one unit), then the up path per box.

        def regional(plan) -> bool:
            return bool(plan) and [box for box, _ in plan] != whole_box

        def units(grid, up_only: bool) -> int:
            return (self.config.levels if up_only else self.stages) if grid.whole else len(grid.tiles)

        total = max(1, sum(int(regional(plan)) + sum(units(grid, regional(plan)) for _, grid in plan)
                           for plan in plans))
        done = 0
        outputs = []
        # no_grad rather than inference_mode: the result stays an ordinary tensor that
        # callers may modify in place (e.g. when pasting the known pixels back).
        with torch.no_grad():
            for i in range(batch):  # one sample at a time bounds peak memory (see decode_memory_estimate)
                partial = regional(plans[i])
                out = image[i:i + 1].float().to(out_device, copy=True) if partial or not plans[i] else None
                mids: dict[torch.dtype, torch.Tensor] = {}

                def latent_input(run_dtype: torch.dtype, i: int = i, partial: bool = partial) -> torch.Tensor:
                    """The whole latent (full decode), or (region decode) the output of the
                    latent-resolution stages run on the whole latent, once per dtype: the mid
                    attention and its GroupNorms then see the whole picture, as in a full decode."""
                    z = latent[i:i + 1].to(device=device, dtype=run_dtype)
                    if not partial:
                        return z
                    if run_dtype not in mids:
                        mids[run_dtype] = self.latent_stage(z)
                    return mids[run_dtype]

                if partial:
                    latent_input(dtype)
                    done += 1
                    report(progress, done, total)
                step_fn = self.up_path if partial else self.forward
                for box, grid in plans[i]:
                    s = self.config.scale
                    ys, xs = slice(box.y * s, (box.y + box.height) * s), slice(box.x * s, (box.x + box.width) * s)

                    def run(run_dtype: torch.dtype, base: int = done, grid=grid, box=box, ys=ys, xs=xs):
                        z = latent_input(run_dtype)[..., box.y:box.y + box.height, box.x:box.x + box.width]
                        img = image_to_model(image[i:i + 1, ys, xs]).to(device=device, dtype=run_dtype)
                        msk = mask[i:i + 1, None, ys, xs].to(device=device, dtype=run_dtype)
                        if grid.whole:
                            steps = iter(range(1, units(grid, partial) + 1))

                            def stage() -> None:
                                report(progress, base + next(steps), total)

                            return step_fn(z, img, msk, stage=stage).float()

                        def tick(n: int, _total: int) -> None:
                            report(progress, base + n, total)

                        return decode_tiled(step_fn, z, img, msk, scale=s, grid=grid, progress=tick)

                    x = run(dtype)
                    if dtype == torch.float16 and not bool(torch.isfinite(x).all()):
                        # float16 tops out at 65504; a decoder whose activations exceed it gives
                        # inf/NaN. Redo this part in float32 (cast layers upcast their weights).
                        log.warning("masked decode overflowed float16; decoding this part again in float32")
                        x = run(torch.float32)
                    done += units(grid, partial)
                    pixels = model_to_image(x).to(out_device)
                    if out is None:
                        out = pixels
                    else:
                        out[:, ys, xs] = pixels
                del mids
                outputs.append(out)
        if done == 0:
            report(progress, total, total)  # nothing to decode (no hole in region mode)
        return torch.cat(outputs, dim=0)

    def decode_boxes(self, mask: torch.Tensor, lh: int, lw: int, region: str) -> list[Tile]:
        """The latent boxes ``decode`` computes for one ``[H, W]`` mask: the whole latent, or
        (``region`` ``"hole"``/``"auto"``) the ``hole_regions`` of the cells holding a hole
        pixel grown by ``config.reach_up_cells`` (the latent-resolution stages run on the
        whole latent, so only the up path's reach is needed); an empty list when there is no hole."""
        whole = [Tile(0, 0, lh, lw)]
        if region == REGION_FULL:
            return whole
        s = self.config.scale
        cells = F.max_pool2d((mask > 0).float()[None, None], s)[0, 0] > 0
        boxes = hole_regions(cells, self.config.reach_up_cells)
        if region == REGION_AUTO and region_share(boxes, lh, lw) > REGION_AUTO_MAX_SHARE:
            return whole
        return boxes

    # ---- input checks ------------------------------------------------------------------

    def _validate(self, latent, image, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(latent, torch.Tensor):
            raise InputError(f"Expected a LATENT tensor, got {type(latent).__name__}.")
        if latent.ndim != 4:
            raise InputError(
                f"The latent must be [batch, channels, height, width]; got shape {list(latent.shape)}. "
                "Connect the LATENT of an image model (video latents are not supported)."
            )
        channels = latent.shape[1]
        if channels != self.latent_channels:
            raise InputError(
                f"This decoder is for {_latent_family(self.latent_channels)} latents "
                f"({self.latent_channels} channels); your latent has {channels} "
                f"({_latent_family(channels)}). {_HINT}"
            )
        if not torch.isfinite(latent).all():
            raise InputError(
                "The latent contains NaN or infinite values: the sampler diverged. Lower the CFG, try "
                "another sampler, or run the model in bfloat16 / float32 instead of float16."
            )
        image, mask = prepare_image_and_mask(image, mask, require_hole=False)
        height, width = image.shape[1], image.shape[2]
        s = self.config.scale
        lh, lw = latent.shape[-2:]
        if (height // s, width // s) == (lh, lw) and (height % s or width % s):
            # VAEEncode cropped this image to multiples of 8 before encoding: do the same.
            image, mask = crop_like_vae_encode(image, mask, s)
            height, width = image.shape[1], image.shape[2]
        if (height, width) != (lh * s, lw * s):
            raise InputError(
                f"IMAGE is {width}x{height} but the latent is {lw}x{lh} cells, which decodes to "
                f"{lw * s}x{lh * s}. Give the decoder the same image (and mask) the latent was "
                "made from, at the same size."
            )
        bl, bi = latent.shape[0], image.shape[0]
        if bi != bl:
            if bi != 1:
                raise InputError(
                    f"The latent has a batch of {bl} but there are {bi} images/masks: give one image "
                    "per latent, or a single image (and mask) for the whole batch."
                )
            image, mask = image.expand(bl, -1, -1, -1), mask.expand(bl, -1, -1)
        return latent, image, mask


def _latent_family(channels: int) -> str:
    return {16: "FLUX", 4: "SD1.5"}.get(channels, "an unknown model's")


def crop_like_vae_encode(image: torch.Tensor, mask: torch.Tensor, scale: int = 8
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop IMAGE ``[B,H,W,C]`` and MASK ``[B,H,W]`` to multiples of ``scale`` the way
    ComfyUI's VAEEncode crops its input: ``size // scale * scale`` pixels, starting
    ``(size % scale) // 2`` pixels in (centred, the odd pixel on the far side)."""
    height, width = image.shape[1], image.shape[2]
    y0, x0 = (height % scale) // 2, (width % scale) // 2
    h, w = height // scale * scale, width // scale * scale
    return image[:, y0:y0 + h, x0:x0 + w], mask[:, y0:y0 + h, x0:x0 + w]


# Spread of raw (ComfyUI LATENT) values, from ComfyUI's latent formats: a sampler works in
# units of std ~1, and the latent is stored as x / scale_factor + shift_factor.
FLUX_LATENT_STD = 1 / 0.3611   # ~2.77
SD3_LATENT_STD = 1 / 1.5305    # ~0.65
_SD3_SUSPECT_STD = (0.05, (FLUX_LATENT_STD * SD3_LATENT_STD) ** 0.5)  # up to the geometric mean, ~1.34


def latent_family_warning(decoder: MaskedDecoder, latent: torch.Tensor) -> str | None:
    """A warning when a latent that fits the decoder by channels looks like another model's.

    Detectable: SD3 and FLUX latents both have 16 channels, but a sampled SD3 latent spreads
    about 4x less (std ~0.65 against ~2.8). Not detectable: SDXL against SD1.5 latents (both
    4 channels, std ~7.7 against ~5.5, overlapping in practice), see docs/decoder.md. An
    all-zero (never sampled) latent gives no warning."""
    if decoder.kind != KIND_ASUKA or latent.shape[1] != 16:
        return None
    std = float(latent.float().std())
    low, high = _SD3_SUSPECT_STD
    if not low < std < high:
        return None
    return (f"This latent's values spread like an SD3 latent (std {std:.2f}; FLUX latents are "
            f"about {FLUX_LATENT_STD:.1f}, SD3 about {SD3_LATENT_STD:.2f}). The ASUKA decoder is "
            "trained for FLUX latents only: an SD3 latent decodes to wrong colours. Decode SD3 "
            "latents with VAE Decode.")


# --------------------------------------------------------------------------------------
# Loading


def load_decoder(source, *, operations=None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> MaskedDecoder:
    """Load a masked decoder from a path (file or diffusers folder), a ``Checkpoint`` or a
    state dict. See docs/decoder.md for the supported files."""
    return MaskedDecoder.from_state_dict(ckpt_mod.as_checkpoint(source), operations=operations,
                                         dtype=dtype, device=device)


def _load_strict(model: MaskedDecoder, weights: dict[str, torch.Tensor], name: str) -> None:
    """Load every weight the decoder needs, refusing missing or mis-shaped ones. Extra
    weights (other ``decoder.*`` keys a training run left in the file) are ignored with a
    log line, as the official ``load_state_dict(strict=False)`` ignores them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if wrong:
            parts.append("unexpected shapes for " + _few(
                [f"{k} {list(weights[k].shape)} (expected {list(expected[k].shape)})" for k in wrong]))
        raise CheckpointError(
            f"{_LOADER}: '{name}' does not have the layout of a masked decoder: {'; '.join(parts)}. "
            "The file is damaged or a variant this pack does not support."
        )
    if unexpected:
        log.info("%s: '%s': ignoring %d weights the decoder does not use: %s", _LOADER, name,
                 len(unexpected), _few(unexpected, 8))
        weights = {k: v for k, v in weights.items() if k in expected}
    model.load_state_dict(weights, strict=True, assign=True)
    model.ignored_keys = tuple(unexpected)


def _few(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


_COND_PREFIX = "condition_encoder.layers."
_ATTN_PROJECTIONS = ("q", "k", "v", "proj_out")
# Keys of a decoder we knowingly drop: the ASUKA/AVQ transposed convs that are built but
# never run (their sizes only shaped the condition encoder).
_UNUSED_LDM = ("up_layers.", "encoder_up_layers.")


def canonical_weights(ckpt: ckpt_mod.Checkpoint) -> dict[str, torch.Tensor]:
    """The decoder's tensors under internal names, from any supported layout.

    Raises CheckpointError naming what the file is when it is not a masked decoder.
    """
    tensors = _with_decoder_prefix(ckpt.tensors)
    kind = ckpt_mod.expect_kind(ckpt_mod.Checkpoint(tensors, ckpt.metadata, ckpt.path),
                                ckpt_mod.DECODER_KINDS, _LOADER, _HINT)
    if kind == ckpt_mod.KIND_DIFFUSERS_ASYM_DECODER:
        weights = _from_diffusers(tensors)
    else:
        weights = _from_ldm(tensors)
    for name in _ATTN_PROJECTIONS:  # 1x1 conv [C, C, 1, 1] -> linear [C, C]
        key = f"mid.attn_1.{name}.weight"
        if key in weights and weights[key].ndim == 4:
            weights[key] = weights[key].flatten(1)
    return weights


def _looks_like_bare_decoder(keys: set[str]) -> bool:
    return "conv_in.weight" in keys and any(k.startswith(("up.", "up_blocks.")) for k in keys)


def _with_decoder_prefix(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a bare decoder state dict (no ``decoder.`` prefix), including one saved from
    ``MaskedDecoder.state_dict()``, by giving it the ldm/diffusers prefix."""
    keys = set(tensors)
    if any(k.startswith("decoder.") for k in keys) or not _looks_like_bare_decoder(keys):
        return dict(tensors)
    internal = any(k.startswith("up.") for k in keys) and any(k.startswith(_COND_PREFIX) for k in keys)
    out = {}
    for k, v in tensors.items():
        if k.startswith(("post_quant_conv.", "quant_conv.")):
            out[k] = v
            continue
        if internal and k.startswith(_COND_PREFIX):
            k = "encoder.layers." + k[len(_COND_PREFIX):]
        out["decoder." + k] = v
    return out


def _from_ldm(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        if key.startswith("post_quant_conv."):
            out[key] = value
        elif key.startswith("decoder."):
            name = key[len("decoder."):]
            if name.startswith(_UNUSED_LDM):
                continue
            if name.startswith("encoder.layers."):
                name = _COND_PREFIX + name[len("encoder.layers."):]
            out[name] = value
    return out


_DIFFUSERS_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                   # names of diffusers' older attention block, still found in some files
                   "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_DIFFUSERS_RESNET = {"conv_shortcut": "nin_shortcut"}


def _from_diffusers(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AsymmetricAutoencoderKL names -> internal (ldm) names. diffusers orders up
    blocks from the lowest resolution, ldm from the highest: ``up_blocks.i`` = ``up.(L-1-i)``."""
    up_ids = {int(m.group(1)) for k in tensors if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    levels = len(up_ids)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        if key.startswith("post_quant_conv."):
            out[key] = value
            continue
        if not key.startswith("decoder."):
            continue  # encoder, quant_conv: not needed to decode
        name = _diffusers_name(key[len("decoder."):], levels)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise CheckpointError(
            f"{_LOADER}: unsupported weights in the diffusers decoder: {_few(sorted(unknown))}. "
            "Only AsymmetricAutoencoderKL with UpDecoderBlock2D blocks is supported."
        )
    return out


def _diffusers_name(name: str, levels: int) -> str | None:
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out",
              "condition_encoder.layers": "condition_encoder.layers"}
    for src, dst in simple.items():
        if name.startswith(src + "."):
            return dst + name[len(src):]
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)", name):
        part = _DIFFUSERS_RESNET.get(m.group(2), m.group(2))
        return f"mid.block_{int(m.group(1)) + 1}.{part}.{m.group(3)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", name):
        part = _DIFFUSERS_ATTN.get(m.group(1))
        return None if part is None else f"mid.attn_1.{part}.{m.group(2)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", name):
        part = _DIFFUSERS_RESNET.get(m.group(3), m.group(3))
        return f"up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.{part}.{m.group(4)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", name):
        return f"up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
    return None


def infer_config(weights: Mapping[str, torch.Tensor]) -> DecoderConfig:
    """Read the architecture from internal-named tensors."""
    def shape(key: str) -> torch.Size:
        if key not in weights:
            raise CheckpointError(f"{_LOADER}: the decoder weights lack '{key}'; the file is incomplete.")
        return weights[key].shape

    levels = sorted({int(m.group(1)) for k in weights if (m := re.match(r"up\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{_LOADER}: could not find the decoder's up levels (up.0 ...); the file is incomplete.")
    blocks = tuple(
        len({int(m.group(1)) for k in weights if (m := re.match(rf"up\.{lv}\.block\.(\d+)\.conv1\.weight$", k))})
        for lv in levels
    )
    widths = tuple(shape(f"up.{lv}.block.0.conv1.weight")[0] for lv in levels)
    n_cond = len({int(m.group(1)) for k in weights if (m := re.match(r"condition_encoder\.layers\.(\d+)\.weight$", k))})
    cond = []
    for i in range(n_cond):
        out_c, in_c, kh, kw = shape(f"{_COND_PREFIX}{i}.weight")
        if kh != kw or kh not in (3, 4):
            raise CheckpointError(
                f"{_LOADER}: condition-encoder layer {i} has a {kh}x{kw} kernel; only 3x3 and 4x4 are known."
            )
        cond.append(CondLayer(in_c, out_c, kh))
    cond_in = cond[0].in_channels if cond else 0
    out_channels, _, _, _ = shape("conv_out.weight")
    if cond_in == out_channels + 1:
        kind = KIND_ASUKA
    elif cond_in == out_channels:
        kind = KIND_AVQ
    else:
        raise CheckpointError(
            f"{_LOADER}: the condition encoder takes {cond_in} channels; expected {out_channels} "
            f"(masked image, Asymmetric VQGAN) or {out_channels + 1} (masked image + mask, ASUKA)."
        )
    post_quant = "post_quant_conv.weight" in weights
    if kind == KIND_AVQ and not post_quant:
        raise CheckpointError(
            f"{_LOADER}: this Asymmetric VQGAN decoder has no post_quant_conv, which SD latents need "
            "before decoding. Use the full checkpoint (it holds post_quant_conv next to decoder.*)."
        )
    latent_c = shape("conv_in.weight")[1]
    mid_c = shape("conv_in.weight")[0]
    bad = sorted({c for c in (*widths, mid_c) if c % GROUPS})
    if bad:
        raise CheckpointError(f"{_LOADER}: widths {bad} are not multiples of {GROUPS} (GroupNorm groups).")
    return DecoderConfig(kind=kind, latent_channels=latent_c, mid_channels=mid_c, widths=widths, blocks=blocks,
                         cond_layers=tuple(cond), out_channels=out_channels, post_quant_conv=post_quant)


# --------------------------------------------------------------------------------------
# Memory


def decode_memory_estimate(decoder: MaskedDecoder, latent_shape, dtype: torch.dtype) -> int:
    """Rough peak bytes of ``decode`` beyond the weights, for ComfyUI's memory manager.

    ``decode`` runs one sample at a time, so the batch only adds the float32 output. The
    per-sample peak is walked through the forward pass: the condition-encoder features that
    stay alive during the up path, plus the largest transient working set of any stage
    (a ResNet holds about its input, two intermediates and its output; an upsample holds its
    input and two tensors at twice the size). Attention scores are not counted: PyTorch's
    fused attention kernels (CPU flash, CUDA flash / memory-efficient) do not store them.
    A 1.25 margin covers allocator slack.
    """
    cfg = decoder.config
    batch, lh, lw = int(latent_shape[0]), int(latent_shape[-2]), int(latent_shape[-1])
    item = torch.empty((), dtype=dtype).element_size()
    full = lh * lw * cfg.scale * cfg.scale            # pixels at full resolution

    def pixels(level: int) -> int:
        return full // (4 ** level)

    features, factor = 0, 1
    for i, layer in enumerate(cfg.cond_layers[: max(decoder._keep) + 1]):
        factor *= layer.stride
        if i in decoder._keep:
            features += layer.out_channels * full // (factor * factor)
    stages = [4 * cfg.mid_channels * pixels(cfg.levels - 1)]
    for lv in range(cfg.levels):
        c_in, c_out = cfg.level_input_channels(lv), cfg.widths[lv]
        stages.append((2 * c_in + 2 * c_out) * pixels(lv))
        if lv:
            stages.append(c_out * pixels(lv) + 2 * c_out * pixels(lv - 1))
    # The condition encoder's own transient: input, pre-ReLU output, ReLU copy at full res.
    cond_peak = max(2 * layer.out_channels + layer.in_channels for layer in cfg.cond_layers[:2]) * full
    per_sample = (features + max(stages + [cond_peak])) * item * 1.25
    output = batch * cfg.out_channels * full * 4 * 2   # float32 result and blend weights
    return int(per_sample + output)


__all__ = ["MaskedDecoder", "DecoderConfig", "CondLayer", "load_decoder", "decode_memory_estimate",
           "crop_like_vae_encode", "latent_family_warning",
           "canonical_weights", "infer_config", "fuse", "KIND_ASUKA", "KIND_AVQ",
           "REGION_MODES", "REGION_AUTO", "REGION_FULL", "REGION_HOLE", "REGION_AUTO_MAX_SHARE"]
