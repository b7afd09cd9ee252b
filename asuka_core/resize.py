"""Bit-exact re-implementations of the two OpenCV resizes the official MAE input uses.

The official ASUKA code prepares the MAE input with ``cv2.resize(img_uint8, (256, 256),
interpolation=cv2.INTER_AREA)`` and ``cv2.resize(mask, (256, 256),
interpolation=cv2.INTER_NEAREST)``. PIL's and PyTorch's resamplers give different
pixels, and the MAE features are sensitive to that, so both are rebuilt here in plain
PyTorch (OpenCV is not a dependency of the pack; the tests use it as an oracle).

Both functions work on ``[B, C, H, W]`` tensors, on any device, and reproduce what
OpenCV 4.x computes on x86 for every size pair (downscale, upscale, mixed), including
its rounding:

* INTER_AREA, both factors >= 1, integer factors: box mean, ``(sum + 2) >> 2`` for 2x2,
  else ``round_half_even(float32(sum) * float32(1 / area))``;
* INTER_AREA, both factors >= 1, otherwise: separable coverage weights, accumulated in
  float32 in OpenCV's order (row pass, then column pass), rounded half to even;
* INTER_AREA with any factor < 1 (upscaling on at least one axis): OpenCV switches to a
  2-tap "bilinear-like" kernel with area-derived weights in 11-bit fixed point;
* INTER_NEAREST: source index ``floor(dst * (1 / (dst_size / src_size)))`` (top-left, not
  centre-based like PIL or ``F.interpolate(mode='nearest-exact')``).

The arithmetic below is done in the same precision and order as OpenCV's C++ so that
results match bit for bit, which is why some expressions look roundabout (a double
computed as ``1 / (d / s)`` rather than ``s / d``, float32 scalars built with numpy).
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache

import numpy as np
import torch

# OpenCV's fixed-point resize: coefficients are scaled by 2**11.
_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS
_DBL_EPSILON = sys.float_info.epsilon


def _scales(src: int, dst: int) -> tuple[float, float]:
    """OpenCV's (scale, inv_scale) for one axis: inv = dst/src, scale = 1/inv (both double)."""
    inv = dst / src
    return 1.0 / inv, inv


def _check_size(x: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"expected a [B, C, H, W] tensor, got shape {list(x.shape)}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or x.shape[-2] <= 0 or x.shape[-1] <= 0:
        raise ValueError(f"cannot resize {list(x.shape[-2:])} to {[h, w]}")
    return h, w


# --------------------------------------------------------------------------------------
# INTER_NEAREST


@lru_cache(maxsize=64)
def _nearest_index(src: int, dst: int) -> tuple[int, ...]:
    scale, _ = _scales(src, dst)
    return tuple(min(math.floor(i * scale), src - 1) for i in range(dst))


def nearest_resize_cv(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``cv2.resize(..., interpolation=cv2.INTER_NEAREST)`` on ``[B, C, H, W]``, any dtype.

    ``size`` is ``(height, width)`` (PyTorch order, unlike OpenCV's ``(width, height)``).
    """
    h, w = _check_size(x, size)
    rows = torch.tensor(_nearest_index(x.shape[-2], h), device=x.device)
    cols = torch.tensor(_nearest_index(x.shape[-1], w), device=x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


# --------------------------------------------------------------------------------------
# INTER_AREA


def area_resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``cv2.resize(..., interpolation=cv2.INTER_AREA)`` on a uint8 ``[B, C, H, W]`` tensor.

    ``size`` is ``(height, width)``. Returns uint8.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"area_resize_uint8 needs uint8 input, got {x.dtype}")
    h, w = _check_size(x, size)
    src_h, src_w = x.shape[-2], x.shape[-1]
    if (src_h, src_w) == (h, w):
        return x.clone()
    scale_y, _ = _scales(src_h, h)
    scale_x, _ = _scales(src_w, w)
    if scale_x >= 1 and scale_y >= 1:
        iscale_y, iscale_x = round(scale_y), round(scale_x)
        if abs(scale_x - iscale_x) < _DBL_EPSILON and abs(scale_y - iscale_y) < _DBL_EPSILON:
            return _area_integer(x, iscale_y, iscale_x)
        return _area_fractional(x, h, w)
    return _area_bilinear_like(x, h, w)


def _area_integer(x: torch.Tensor, fy: int, fx: int) -> torch.Tensor:
    """Whole-number factors: OpenCV's 'fast area' box filter."""
    b, c, sh, sw = x.shape
    sums = x.reshape(b, c, sh // fy, fy, sw // fx, fx).sum(dim=(3, 5), dtype=torch.int32)
    area = fy * fx
    if fy == 2 and fx == 2:
        # OpenCV's dedicated 2x2 path rounds half up in integers.
        return ((sums + 2) >> 2).to(torch.uint8)
    # Generic path: float32 sum times the float32 reciprocal, then cvRound (half to even).
    inv_area = torch.tensor(np.float32(1.0) / np.float32(area), device=x.device)
    return torch.round(sums.to(torch.float32) * inv_area).clamp_(0, 255).to(torch.uint8)


@lru_cache(maxsize=64)
def _area_table(src: int, dst: int) -> tuple[tuple[int, ...], tuple[float, ...], int]:
    """OpenCV's ``computeResizeAreaTab`` (source pixels covering each output pixel, with
    their float32 coverage weights, in increasing source order), padded to the same
    number of taps per output: returns ``(src_index, weight, taps)`` with the first two
    flat ``[taps * dst]``, tap-major. Padding taps have weight 0; adding their exact 0.0
    leaves the float32 sums unchanged."""
    scale, _ = _scales(src, dst)
    per_dst: list[list[tuple[int, float]]] = []
    for d in range(dst):
        fsx1 = d * scale
        fsx2 = fsx1 + scale
        cell = min(scale, src - fsx1)
        sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
        sx2 = min(sx2, src - 1)
        sx1 = min(sx1, sx2)
        taps: list[tuple[int, float]] = []
        if sx1 - fsx1 > 1e-3:
            taps.append((sx1 - 1, float(np.float32((sx1 - fsx1) / cell))))
        for s in range(sx1, sx2):
            taps.append((s, float(np.float32(1.0 / cell))))
        if fsx2 - sx2 > 1e-3:
            taps.append((sx2, float(np.float32(min(min(fsx2 - sx2, 1.0), cell) / cell))))
        per_dst.append(taps)
    n_taps = max(len(t) for t in per_dst)
    index = [0] * (n_taps * dst)
    weight = [0.0] * (n_taps * dst)
    for d, taps in enumerate(per_dst):
        for k, (s, a) in enumerate(taps):
            index[k * dst + d] = s
            weight[k * dst + d] = a
    return tuple(index), tuple(weight), n_taps


def _weighted_taps(x: torch.Tensor, dim: int, src: int, dst: int) -> torch.Tensor:
    """Sum over taps of ``x[index] * weight`` along ``dim`` in float32, tap by tap, each
    product and each addition rounded separately (OpenCV's scalar loop). ``x`` may be
    uint8: only the gathered columns are converted (uint8 * float32 -> float32, exact
    conversion), so a large source is never copied to float32 as a whole."""
    index, weight, n_taps = _area_table(src, dst)
    index_t = torch.tensor(index, device=x.device).view(n_taps, dst)
    weight_t = torch.tensor(weight, dtype=torch.float32, device=x.device).view(n_taps, dst)
    shape = [1] * x.ndim
    shape[dim] = dst
    acc = None
    for k in range(n_taps):
        term = x.index_select(dim, index_t[k]) * weight_t[k].view(shape)
        acc = term if acc is None else acc + term
    return acc


def _area_fractional(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Non-integer downscaling: exact pixel-coverage weights (OpenCV ``resizeArea_``)."""
    rows = _weighted_taps(x, -1, x.shape[-1], w)  # row pass first, as OpenCV
    out = _weighted_taps(rows, -2, x.shape[-2], h)
    return torch.round(out).clamp_(0, 255).to(torch.uint8)


@lru_cache(maxsize=64)
def _bilinear_like_table(src: int, dst: int, clamp_last: bool
                         ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Per output index: (first source index, weight of it, weight of the next one), the
    weights in 11-bit fixed point, as OpenCV's ``resize`` computes them for INTER_AREA when
    it falls back to its generic 2-tap path. OpenCV clamps the last source pixel to a
    single tap on the horizontal axis only (``clamp_last``); vertically it clips the row
    index and keeps both weights."""
    scale, inv = _scales(src, dst)
    first, w0, w1 = [], [], []
    for d in range(dst):
        s = math.floor(d * scale)
        f = np.float32((d + 1) - (s + 1) * inv)
        f = np.float32(0.0) if f <= 0 else np.float32(f - np.float32(math.floor(f)))
        if clamp_last and s >= src - 1:
            s, f = src - 1, np.float32(0.0)
        first.append(s)
        w0.append(int(np.rint(np.float32(np.float32(1.0) - f) * np.float32(_COEF_SCALE))))
        w1.append(int(np.rint(f * np.float32(_COEF_SCALE))))
    return tuple(first), tuple(w0), tuple(w1)


def _area_bilinear_like(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """INTER_AREA when enlarging along at least one axis (OpenCV's fixed-point path)."""
    src_h, src_w = x.shape[-2], x.shape[-1]
    dev = x.device
    cx, ax0, ax1 = (torch.tensor(t, device=dev) for t in _bilinear_like_table(src_w, w, True))
    cy, by0, by1 = (torch.tensor(t, device=dev) for t in _bilinear_like_table(src_h, h, False))
    # Horizontal pass in integers: S[sx] * a0 + S[sx + 1] * a1 (exact).
    nxt = (cx + 1).clamp_(max=src_w - 1)
    rows = (x.index_select(-1, cx).to(torch.int32) * ax0.to(torch.int32)
            + x.index_select(-1, nxt).to(torch.int32) * ax1.to(torch.int32))
    # Vertical pass: OpenCV's 8-bit output stage, (((b0*(S0>>4))>>16) + ((b1*(S1>>4))>>16) + 2) >> 2.
    nyt = (cy + 1).clamp_(max=src_h - 1)
    r0 = rows.index_select(-2, cy) >> 4
    r1 = rows.index_select(-2, nyt) >> 4
    b0 = by0.to(torch.int32).view(-1, 1)
    b1 = by1.to(torch.int32).view(-1, 1)
    out = (((b0 * r0) >> 16) + ((b1 * r1) >> 16) + 2) >> 2
    return out.clamp_(0, 255).to(torch.uint8)
