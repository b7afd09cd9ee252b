"""Tiled decoding: overlapping latent tiles, decoded separately, blended with feathered weights.

Tiles are square-ish windows of ``tile`` latent cells stepping by ``tile - overlap``; the
last tile on each axis is anchored at the far edge, so every tile has full size (unless
the latent is smaller than a tile) and tiles need not divide the latent. Each tile is
decoded with the matching image and mask crop. Where tiles overlap, a tile's weight ramps
linearly from almost 0 at an inner edge to 1 over ``overlap`` cells, so neighbouring tiles
cross-fade instead of meeting at a seam; edges on the image border are not ramped.

Tiling is not exact for these decoders: each tile's GroupNorm statistics, mid attention and
border padding see only the tile. docs/decoder.md states the measured difference.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .errors import InputError
from .runtime import Progress, report

MIN_TILE = 8  # latent cells (64 px): smaller tiles make GroupNorm statistics meaningless


class Tile(NamedTuple):
    y: int        # latent cells
    x: int
    height: int
    width: int


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``tile`` overlapping by at least ``overlap``."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    return [*range(0, length - tile, stride), length - tile]


class TileGrid(NamedTuple):
    tiles: list[Tile]
    overlap: int  # latent cells, after clamping
    height: int   # the whole latent, in cells
    width: int

    @property
    def whole(self) -> bool:
        return len(self.tiles) == 1


def tile_grid(height: int, width: int, tile_size: int | None, overlap: int) -> TileGrid:
    """Tiles for a latent of ``height`` x ``width`` cells; one whole tile when ``tile_size`` is None.

    ``overlap`` is clamped to ``[0, tile_size // 2]`` so that a tile's two feather ramps
    never overlap each other and the number of tiles stays bounded.
    """
    if tile_size is None:
        return TileGrid([Tile(0, 0, height, width)], 0, height, width)
    if tile_size < MIN_TILE:
        raise InputError(
            f"tile_size {tile_size} is too small: use at least {MIN_TILE} latent cells "
            f"({MIN_TILE * 8} px), or no tiling."
        )
    overlap = max(0, min(int(overlap), tile_size // 2))
    th, tw = min(tile_size, height), min(tile_size, width)
    tiles = [Tile(y, x, th, tw)
             for y in axis_starts(height, tile_size, overlap)
             for x in axis_starts(width, tile_size, overlap)]
    return TileGrid(tiles, overlap, height, width)


def _ramp(size: int, ramp: int, start: bool, end: bool) -> torch.Tensor:
    """1-D feather: rises over ``ramp`` samples at a ramped start, falls at a ramped end.
    Strictly positive, so every covered pixel gets a non-zero total weight."""
    pos = torch.arange(size, dtype=torch.float32) + 0.5
    weight = torch.ones(size)
    if ramp > 0 and start:
        weight = torch.minimum(weight, pos / ramp)
    if ramp > 0 and end:
        weight = torch.minimum(weight, (size - pos) / ramp)
    return weight


def feather(tile: Tile, grid: TileGrid, scale: int) -> torch.Tensor:
    """[H_tile, W_tile] pixel weights of ``tile``: ramps only on edges shared with a neighbour."""
    ramp = grid.overlap * scale
    wy = _ramp(tile.height * scale, ramp, tile.y > 0, tile.y + tile.height < grid.height)
    wx = _ramp(tile.width * scale, ramp, tile.x > 0, tile.x + tile.width < grid.width)
    return wy[:, None] * wx[None, :]


DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decode_tiled(decode: DecodeFn, latent: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, *,
                 scale: int, grid: TileGrid, progress: Progress = None) -> torch.Tensor:
    """Run ``decode(latent, image, mask)`` per tile and blend. ``latent`` [B,C,h,w];
    ``image``/``mask`` [B,*,h*scale,w*scale]. Returns float32 [B,3,H,W] on the latent's device."""
    if grid.whole:
        out = decode(latent, image, mask).float()
        report(progress, 1, 1)
        return out
    height, width = grid.height * scale, grid.width * scale
    acc = None
    total_weight = torch.zeros(height, width, device=latent.device)
    for n, t in enumerate(grid.tiles, start=1):
        ys, xs = slice(t.y * scale, (t.y + t.height) * scale), slice(t.x * scale, (t.x + t.width) * scale)
        out = decode(latent[..., t.y:t.y + t.height, t.x:t.x + t.width],
                     image[..., ys, xs], mask[..., ys, xs]).float()
        if acc is None:
            acc = torch.zeros(out.shape[0], out.shape[1], height, width, device=latent.device)
        weight = feather(t, grid, scale).to(latent.device)
        acc[..., ys, xs] += out * weight
        total_weight[ys, xs] += weight
        report(progress, n, len(grid.tiles))
    return acc / total_weight
