"""Seeded inpainting masks of the families ASUKA is trained and evaluated on.

ASUKA's training masks (paper §3.1) mix three families:

* ``object``: object-shaped holes (50 %). With a folder of object masks (e.g. segment
  masks cut from a dataset) they come from there, randomly scaled, flipped and placed;
  half of them are combined with an irregular mask. Without a folder the generator draws
  smooth random silhouettes instead (star-shaped outlines with a few low harmonics): a
  stand-in, said so by ``MaskGenerator.object_source``.
* ``irregular``: free-form brush strokes (40 %), half LaMa-style thick strokes (1-5 joined
  segments per stroke, optionally with boxes), half Co-Mod-GAN-style brushes (4-17
  vertices, turning angle about 2π/5).
* ``box``: rectangles (10 %); a quarter of them as the complement of a rectangle (only a
  border is kept).

Every mask is a function of ``(seed, index)`` alone, so a mask set is reproducible, can be
generated in any order and resumed anywhere. The hole ratio is kept inside
``hole_ratio`` (default 0.1-0.75): a mask outside it is redrawn, and after
``max_tries`` a centred box of the right area is used (never seen in practice with the
defaults; ``tests/unit/test_masks.py`` checks the ratio over many masks).

Shapes are drawn at 512 px and scaled with the image, so a mask family looks the same
at every size. Masks are ``[H, W]`` float32 tensors, 1 = hole (ComfyUI's MASK).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .errors import InputError

FAMILIES = ("object", "irregular", "box")
TRAINING_SHARES = {"object": 0.5, "irregular": 0.4, "box": 0.1}
"""The paper's training mix (§3.1 of the ASUKA paper)."""
EVALUATION_SHARES = {"object": 0.5, "irregular": 0.5, "box": 0.0}
"""MISATO's mix: the training families without regular masks."""
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

Size = Union[int, Sequence[int]]


def _hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 16 or w < 16:
        raise InputError(f"Mask size must be at least 16x16 pixels; got {h}x{w}.")
    return h, w


# ------------------------------------------------------------------------------ drawing

def draw_polyline(canvas: np.ndarray, points: np.ndarray, width: float) -> None:
    """Set to True every pixel within ``width / 2`` of the polyline (round caps and
    joints), in place. ``points`` is ``[N, 2]`` as (x, y) in pixels."""
    h, w = canvas.shape
    r = max(width / 2.0, 0.5)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        xa, xb = int(max(math.floor(min(x0, x1) - r), 0)), int(min(math.ceil(max(x0, x1) + r) + 1, w))
        ya, yb = int(max(math.floor(min(y0, y1) - r), 0)), int(min(math.ceil(max(y0, y1) + r) + 1, h))
        if xa >= xb or ya >= yb:
            continue
        ys, xs = np.mgrid[ya:yb, xa:xb].astype(np.float64)
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        t = 0.0 if length2 == 0 else np.clip(((xs - x0) * dx + (ys - y0) * dy) / length2, 0.0, 1.0)
        d2 = (xs - (x0 + t * dx)) ** 2 + (ys - (y0 + t * dy)) ** 2
        canvas[ya:yb, xa:xb] |= d2 <= r * r


def _box(canvas: np.ndarray, rng: np.random.Generator, lo: float, hi: float, scale: float) -> None:
    h, w = canvas.shape
    bh = int(min(h, max(4, rng.uniform(lo, hi) * scale)))
    bw = int(min(w, max(4, rng.uniform(lo, hi) * scale)))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    canvas[y:y + bh, x:x + bw] = True


def _lama_strokes(canvas: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """LaMa-style 'medium' irregular mask: thick strokes of joined segments, sometimes boxes."""
    h, w = canvas.shape
    if rng.random() < 0.3 / 1.3:
        for _ in range(int(rng.integers(1, 6))):
            _box(canvas, rng, 30, 150, scale)
        return
    for stroke in range(int(rng.integers(4, 11))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        width = (5 + rng.uniform(0, 100)) * scale
        points = [(x, y)]
        for _ in range(int(rng.integers(1, 6))):
            angle = 0.01 + rng.uniform(0, 4.0)
            if stroke % 2 == 0:
                angle = 2 * math.pi - angle
            length = (10 + rng.uniform(0, 200)) * scale
            x = float(np.clip(x + length * math.sin(angle), 0, w - 1))
            y = float(np.clip(y + length * math.cos(angle), 0, h - 1))
            points.append((x, y))
        draw_polyline(canvas, np.array(points), width)


def _comod_brushes(canvas: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Co-Mod-GAN-style free-form brushes (a few boxes now and then)."""
    h, w = canvas.shape
    diag = math.hypot(h, w)
    for _ in range(int(rng.integers(1, 5))):
        n = int(rng.integers(4, 18))
        mean_angle = 2 * math.pi / 5
        width = rng.uniform(12, 48) * scale
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        points = [(x, y)]
        for i in range(n):
            angle = rng.uniform(mean_angle - 2 * math.pi / 15, mean_angle + 2 * math.pi / 15)
            if i % 2 == 0:
                angle = 2 * math.pi - angle
            length = float(np.clip(rng.normal(diag / 8, diag / 16), 0, 2 * diag / 8))
            x = float(np.clip(x + length * math.cos(angle), 0, w - 1))
            y = float(np.clip(y + length * math.sin(angle), 0, h - 1))
            points.append((x, y))
        draw_polyline(canvas, np.array(points), width)
    if rng.random() < 0.3:
        _box(canvas, rng, 40, 200, scale)
    if rng.random() < 0.5:
        canvas[:] = canvas[:, ::-1]
    if rng.random() < 0.5:
        canvas[:] = canvas[::-1, :]


def _irregular(canvas: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    (_lama_strokes if rng.random() < 0.5 else _comod_brushes)(canvas, rng, scale)


def _regular(canvas: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    h, w = canvas.shape
    if rng.random() < 0.25:  # the complement of a rectangle: only a border stays visible
        keep_h, keep_w = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
        y, x = int(rng.integers(0, h - keep_h + 1)), int(rng.integers(0, w - keep_w + 1))
        canvas[:] = True
        canvas[y:y + keep_h, x:x + keep_w] = False
        return
    for _ in range(int(rng.integers(1, 4))):
        _box(canvas, rng, 64, 320, scale)


def _silhouette(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A smooth random object outline: r(θ) = r0 · (1 + Σ a_k cos(kθ + φ_k)), k = 2..5."""
    h, w = canvas.shape
    r0 = rng.uniform(0.15, 0.4) * min(h, w)
    cy, cx = rng.uniform(r0, h - r0), rng.uniform(r0, w - r0)
    ks = np.arange(2, 6)
    amps = rng.uniform(0, 0.35, size=ks.size) / ks ** 0.5
    phases = rng.uniform(0, 2 * math.pi, size=ks.size)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = np.arctan2(ys - cy, xs - cx)
    radius = r0 * (1 + (amps[:, None, None] * np.cos(ks[:, None, None] * theta + phases[:, None, None])).sum(0))
    sy = rng.uniform(0.6, 1.4)  # stretch: tall or wide objects
    canvas |= ((xs - cx) ** 2 + ((ys - cy) / sy) ** 2) <= radius ** 2


def _paste_object(canvas: np.ndarray, rng: np.random.Generator, shape: np.ndarray,
                  hole_ratio: tuple[float, float]) -> None:
    """Scale an object mask so its area is a random ratio of the canvas, flip, place."""
    h, w = canvas.shape
    sh, sw = shape.shape
    area = max(int(shape.sum()), 1)
    target = rng.uniform(*hole_ratio) * h * w
    s = min(math.sqrt(target / area), h / sh, w / sw)
    nh, nw = max(1, int(round(sh * s))), max(1, int(round(sw * s)))
    ys = np.minimum((np.arange(nh) / s).astype(int), sh - 1)   # nearest neighbour, no cv2/PIL
    xs = np.minimum((np.arange(nw) / s).astype(int), sw - 1)
    obj = shape[ys][:, xs]
    if rng.random() < 0.5:
        obj = obj[:, ::-1]
    y, x = int(rng.integers(0, h - nh + 1)), int(rng.integers(0, w - nw + 1))
    canvas[y:y + nh, x:x + nw] |= obj


# ------------------------------------------------------------------------------ generator

def load_mask_folder(folder: str) -> list[np.ndarray]:
    """Read every image in ``folder`` (recursively) as a boolean object mask
    (> 127 = object), cropped to its bounding box. Empty files are skipped."""
    from PIL import Image  # Pillow comes with ComfyUI; only needed for folders

    if not os.path.isdir(folder):
        raise InputError(f"Mask folder '{folder}' does not exist.")
    shapes = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if not name.lower().endswith(MASK_EXTENSIONS):
                continue
            path = os.path.join(root, name)
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("L")) > 127
            except OSError as e:
                raise InputError(f"Could not read mask '{path}': {e}. Remove or replace the file.") from e
            ys, xs = np.nonzero(arr)
            if ys.size:
                shapes.append(arr[ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy())
    if not shapes:
        raise InputError(
            f"No usable mask images in '{folder}' (expected {', '.join(MASK_EXTENSIONS)} files with "
            "white objects on black)."
        )
    return shapes


class MaskGenerator:
    """``gen(i)`` -> mask ``i`` of a reproducible sequence (``[H, W]`` float32, 1 = hole).

    size: ``int`` or ``(height, width)``. shares: family -> weight (normalised); default
    the paper's training mix. object_masks: a folder or a list of boolean arrays used for
    the ``object`` family; without it, smooth random silhouettes.
    """

    def __init__(self, size: Size, *, seed: int = 0, shares: Optional[Mapping[str, float]] = None,
                 hole_ratio: tuple[float, float] = (0.1, 0.75),
                 object_masks: Union[str, Sequence[np.ndarray], None] = None, max_tries: int = 50):
        self.height, self.width = _hw(size)
        self.seed = int(seed)
        shares = dict(TRAINING_SHARES if shares is None else shares)
        unknown = set(shares) - set(FAMILIES)
        if unknown:
            raise InputError(f"Unknown mask families {sorted(unknown)}; use {list(FAMILIES)}.")
        weights = np.array([max(float(shares.get(f, 0.0)), 0.0) for f in FAMILIES])
        if weights.sum() <= 0:
            raise InputError("Mask family shares must not all be zero.")
        self.shares = dict(zip(FAMILIES, (weights / weights.sum()).tolist()))
        lo, hi = float(hole_ratio[0]), float(hole_ratio[1])
        if not 0.0 < lo < hi <= 1.0:
            raise InputError(f"hole_ratio must satisfy 0 < low < high <= 1; got {hole_ratio}.")
        self.hole_ratio = (lo, hi)
        if isinstance(object_masks, str):
            object_masks = load_mask_folder(object_masks)
        self.object_masks = [np.asarray(m, dtype=bool) for m in object_masks] if object_masks else []
        self.max_tries = max_tries

    @property
    def object_source(self) -> str:
        return f"{len(self.object_masks)} object masks" if self.object_masks else "random silhouettes"

    def family(self, index: int) -> str:
        rng = np.random.default_rng([self.seed, int(index), 0])
        return str(rng.choice(FAMILIES, p=[self.shares[f] for f in FAMILIES]))

    def _draw(self, family: str, rng: np.random.Generator) -> np.ndarray:
        canvas = np.zeros((self.height, self.width), dtype=bool)
        scale = min(self.height, self.width) / 512.0
        if family == "box":
            _regular(canvas, rng, scale)
        elif family == "irregular":
            _irregular(canvas, rng, scale)
        else:
            if self.object_masks:
                shape = self.object_masks[int(rng.integers(len(self.object_masks)))]
                _paste_object(canvas, rng, shape, self.hole_ratio)
            else:
                _silhouette(canvas, rng)
            if rng.random() < 0.5:
                _irregular(canvas, rng, scale * 0.5)
        return canvas

    def numpy(self, index: int) -> np.ndarray:
        """Mask ``index`` as a boolean ``[H, W]`` array."""
        family = self.family(index)
        lo, hi = self.hole_ratio
        for attempt in range(self.max_tries):
            canvas = self._draw(family, np.random.default_rng([self.seed, int(index), 1 + attempt]))
            if lo <= canvas.mean() <= hi:
                return canvas
        # fallback: a centred box whose area is in the middle of the range
        canvas = np.zeros((self.height, self.width), dtype=bool)
        side = math.sqrt((lo + hi) / 2)
        bh, bw = max(1, int(self.height * side)), max(1, int(self.width * side))
        y, x = (self.height - bh) // 2, (self.width - bw) // 2
        canvas[y:y + bh, x:x + bw] = True
        return canvas

    def __call__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.numpy(index).astype(np.float32))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Masks for ``indices`` as a ComfyUI MASK ``[B, H, W]``."""
        return torch.stack([self(i) for i in indices])
