"""Tiled decoding: overlapping latent tiles, decoded separately, blended with feathered weights.

Tiles are square-ish windows of ``tile`` latent cells stepping by ``tile - overlap``; the
last tile on each axis is anchored at the far edge, so every tile has full size (unless
the latent is smaller than a tile) and tiles need not divide the latent. Each tile is
decoded with the matching image and mask crop. Where tiles overlap, a tile's weight ramps
linearly from almost 0 at an inner edge to 1 over ``overlap`` cells, so neighbouring tiles
cross-fade instead of meeting at a seam; edges on the image border are not ramped.

Tiling is not exact for these decoders: each tile's GroupNorm statistics, mid attention and
border padding see only the tile. docs/decoder.md states the measured difference.

Regions (``hole_regions``): when only the pixels of a hole are kept (everything else is
pasted back from the original), only the cells that can reach the hole need computing. The
hole's cells are grown by a reach (square window) and cut into disjoint boxes, each of
which is then decoded alone (and tiled inside itself like a whole picture when asked).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

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


def grow_cells(hole: torch.Tensor, reach: int) -> torch.Tensor:
    """[h, w] bool: every cell within ``reach`` cells (square window) of a True cell."""
    if reach <= 0:
        return hole.bool()
    grown = F.max_pool2d(hole[None, None].float(), 2 * reach + 1, stride=1, padding=reach)
    return grown[0, 0] > 0


def _runs(occupied: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-D bool tensor."""
    padded = F.pad(occupied.to(torch.int8), (1, 1))
    edges = torch.nonzero(padded[1:] != padded[:-1]).flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def _cut(cells: torch.Tensor, y0: int, x0: int) -> list[Tile]:
    """Recursive X-Y cut of the True cells of ``cells`` (offset ``y0, x0``) into boxes
    separated by empty rows or columns."""
    rows = _runs(cells.any(dim=1))
    if not rows:
        return []
    if len(rows) == 1:
        cols = _runs(cells[rows[0][0]:rows[0][1]].any(dim=0))
        if len(cols) == 1:
            (ra, rb), (ca, cb) = rows[0], cols[0]
            return [Tile(y0 + ra, x0 + ca, rb - ra, cb - ca)]
        ra, rb = rows[0]
        return [box for ca, cb in cols for box in _cut(cells[ra:rb, ca:cb], y0 + ra, x0 + ca)]
    return [box for ra, rb in rows for box in _cut(cells[ra:rb], y0 + ra, x0)]


def hole_regions(hole: torch.Tensor, reach: int) -> list[Tile]:
    """Disjoint boxes (latent cells) that together hold every cell within ``reach`` cells of
    a hole cell (``hole`` [h, w] bool, clipped to the grid). Each hole cell's whole
    ``2 * reach + 1`` square lies inside a single box (a square is connected, so no cut
    splits it), so a hole cell is at least ``reach`` cells from any box edge that is not
    the picture's edge. No hole: no boxes."""
    return _cut(grow_cells(hole, reach), 0, 0)


def region_share(boxes: list[Tile], height: int, width: int) -> float:
    """The part of a ``height`` x ``width`` grid the boxes cover (they are disjoint)."""
    return sum(b.height * b.width for b in boxes) / float(height * width)


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
