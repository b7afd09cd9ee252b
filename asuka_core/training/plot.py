"""Pictures the trainer writes: the loss curve and sample grids (Pillow only)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def _smooth(values: Sequence[float], weight: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def loss_curve_png(path: str, train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]],
                   size: tuple[int, int] = (900, 500)) -> None:
    """Training loss (light: raw, dark: smoothed) and held-out loss (red dots and line)
    against the optimiser step, log-scaled loss axis."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    points = [v for _, v in train] + [v for _, v in val]
    points = [v for v in points if v > 0 and math.isfinite(v)]
    d.text((left, 8), "aligner training: epsilon loss (grey/black = training, red = held-out)", fill="black")
    if not points:
        img.save(path)
        return
    lo, hi = math.log10(min(points)), math.log10(max(points))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    steps = [s for s, _ in train] + [s for s, _ in val]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)

    def xy(step, value):
        x = left + (w - left - right) * (step - s0) / (s1 - s0)
        y = top + (h - top - bottom) * (1 - (math.log10(max(value, 1e-12)) - lo) / (hi - lo))
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        v = 10 ** (lo + (hi - lo) * k / 4)
        _, y = xy(s0, v)
        d.line([left - 4, y, left, y], fill="black")
        d.text((4, y - 6), f"{v:.4g}", fill="black")
    for k in range(5):
        s = s0 + (s1 - s0) * k / 4
        x, _ = xy(s, 10 ** lo)
        d.text((x - 10, h - bottom + 6), f"{int(s)}", fill="black")
    if train:
        raw = [xy(s, v) for s, v in train]
        if len(raw) > 1:
            d.line(raw, fill=(190, 190, 190), width=1)
            smooth = _smooth([v for _, v in train], 0.9 if len(train) > 50 else 0.5)
            d.line([xy(s, v) for (s, _), v in zip(train, smooth)], fill="black", width=2)
    if val:
        pts = [xy(s, v) for s, v in val]
        if len(pts) > 1:
            d.line(pts, fill=(220, 0, 0), width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(220, 0, 0))
    img.save(path)


def sample_grid_png(path: str, rows: Sequence[torch.Tensor]) -> None:
    """Save images side by side: each entry of ``rows`` is one IMAGE ``[N, H, W, 3]``
    (for example: masked input, result, original); row r, column n."""
    from PIL import Image

    arrays = [(r.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8) for r in rows]
    n, hh, ww = arrays[0].shape[:3]
    canvas = np.full((len(arrays) * hh, n * ww, 3), 255, np.uint8)
    for r, a in enumerate(arrays):
        for i in range(n):
            canvas[r * hh:(r + 1) * hh, i * ww:(i + 1) * ww] = a[i]
    Image.fromarray(canvas).save(path)
