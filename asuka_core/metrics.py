"""Inpainting quality metrics, as plain maths (torch + numpy, no learned weights).

Conventions: images are ``[H, W, 3]`` RGB in 0..1 (numpy arrays or tensors, uint8 is
accepted and divided by 255), masks ``[H, W]`` with 1 = hole. Every function returns a
Python float for one image pair.

Following the ASUKA evaluation code (MISATO), the prediction is first pasted into the
ground truth outside the *binarised* mask (``mask >= 0.5``), then scored:

* ``psnr``: on 0..1 values over the whole image, ``-10 log10(MSE + 1e-7)`` (the 1e-7 keeps
  a perfect result finite: 70 dB).
* ``ssim``: on the grey image (``0.2989 R + 0.587 G + 0.114 B``), 7x7 uniform window,
  sample covariance, K1 = 0.01, K2 = 0.03, averaged over the window positions that fit
  inside the image (what ``skimage.metrics.structural_similarity`` does with its defaults).
* ``grad``: the boundary gradient score of the ASUKA code. Per RGB channel on the 0..255
  scale, 3x3 Sobel x / y gradients of the pasted result and of the ground truth (reflected
  border); the magnitude of their difference, averaged over the pixels of the mask's
  boundary as OpenCV's ``Canny(mask, 100, 200)`` marks it; averaged over channels. Lower is
  better; 0 when the result continues the ground truth's gradients across the seam.
* ``seam``: colour seam. Lab means of an ``band``-px band just inside the hole and just
  outside it; the step between them (a Lab vector) minus the ground truth's step, as a
  Euclidean length (ΔE76). 0 when the fill meets its surroundings as the original did; a
  colour cast inside the hole shows up here even when PSNR hardly moves.
* ``unmasked_de2000``: mean CIEDE2000 between the *raw* output (before compositing) and
  the ground truth over the pixels outside the hole: the colour drift of a decoder that
  re-encodes the whole image (0 when the workflow pastes the original back).

``rgb_to_lab`` (sRGB, D65) and ``ciede2000`` (Sharma, Wu and Dalal 2005) are exposed for
reuse. Learned metrics (LPIPS, FID, IDS) need network weights: the Fréchet distance and
the inception discriminative scores on given features are here (``frechet_distance``,
``discriminative_scores``); the feature networks live with the evaluation script.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

Array = Union[np.ndarray, torch.Tensor]

GREY_WEIGHTS = (0.2989, 0.587, 0.114)   # torchvision's rgb_to_grayscale, as in the ASUKA eval
PSNR_EPS = 1e-7
SEAM_BAND = 8

# sRGB (IEC 61966-2-1) linear RGB -> XYZ, and the D65 2° white point
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)

METRICS = ("psnr", "ssim", "grad", "seam", "unmasked_de2000")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "grad": False, "seam": False, "unmasked_de2000": False,
                    "lpips": False}


# ------------------------------------------------------------------------------ inputs

def _tensor(x: Array) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))   # a copy: arrays may be read-only


def _as64(x: Array) -> torch.Tensor:
    """float64; uint8 is divided by 255."""
    t = _tensor(x)
    return t.to(torch.float64) / 255.0 if t.dtype == torch.uint8 else t.to(torch.float64)


def _image(x: Array, name: str) -> torch.Tensor:
    t = _as64(x)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[-1] != 3:
        raise InputError(f"{name} must be an RGB image [height, width, 3]; got shape {list(t.shape)}.")
    return t


def _mask(m: Array, shape: tuple[int, int]) -> torch.Tensor:
    t = _as64(m)
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"The mask is {list(t.shape)} but the image is {list(shape)}: they must match.")
    return t


def binarise(mask: Array) -> torch.Tensor:
    """``mask >= 0.5`` as a bool ``[H, W]`` tensor (the ASUKA evaluation's threshold)."""
    t = _tensor(mask)
    if t.dtype == torch.bool:
        return t
    return _as64(t) >= 0.5


def paste(result: Array, truth: Array, mask: Array) -> torch.Tensor:
    """The result inside the binarised hole, the ground truth elsewhere (float64, 0..1)."""
    r, g = _image(result, "result"), _image(truth, "ground truth")
    if r.shape != g.shape:
        raise InputError(f"The result is {list(r.shape)} but the ground truth is {list(g.shape)}.")
    hole = binarise(_mask(mask, g.shape[:2]))
    return torch.where(hole[..., None], r, g)


# ------------------------------------------------------------------------------ PSNR / SSIM

def psnr(result: Array, truth: Array, mask: Array) -> float:
    pred, gt = paste(result, truth, mask), _image(truth, "ground truth")
    mse = torch.mean((pred - gt) ** 2).item()
    return -10.0 * math.log10(mse + PSNR_EPS)


def _grey(img: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GREY_WEIGHTS, dtype=img.dtype)
    return (img * w).sum(-1)


def ssim_grey(a: torch.Tensor, b: torch.Tensor, win: int = 7, data_range: float = 1.0) -> float:
    """Mean SSIM of two ``[H, W]`` images (uniform ``win`` x ``win`` window, sample covariance,
    valid window positions only)."""
    if min(a.shape) < win:
        raise InputError(f"SSIM needs images of at least {win}x{win} pixels; got {list(a.shape)}.")
    x, y = a, b

    def mean(t):   # window means at the valid positions, by running sums along both axes
        c = F.pad(t.cumsum(-1), (1, 0))
        t = c[..., win:] - c[..., :-win]
        c = F.pad(t.cumsum(-2), (0, 0, 1, 0))
        return (c[win:] - c[:-win]) / (win * win)

    n = win * win
    cov_norm = n / (n - 1)
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean().item()


def ssim(result: Array, truth: Array, mask: Array) -> float:
    pred, gt = paste(result, truth, mask), _image(truth, "ground truth")
    return ssim_grey(_grey(pred), _grey(gt))


# ------------------------------------------------------------------------------ Grad

def _sobel(x: torch.Tensor, border: str) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 Sobel d/dx, d/dy of ``[N, 1, H, W]``; border 'reflect' (OpenCV's REFLECT_101) or
    'replicate'. Written with shifted slices (exact, and much faster than a float64 conv)."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), mode=border)
    ddx = p[..., 2:] - p[..., :w]                 # [.., H + 2, W]: right minus left
    ddy = p[..., 2:, :] - p[..., :h, :]           # [.., H, W + 2]: below minus above
    gx = ddx[..., :h, :] + 2 * ddx[..., 1:h + 1, :] + ddx[..., 2:, :]
    gy = ddy[..., :w] + 2 * ddy[..., 1:w + 1] + ddy[..., 2:]
    return gx, gy


def canny(image: Array, low: float = 100, high: float = 200) -> torch.Tensor:
    """OpenCV's ``Canny(image, low, high)`` (3x3 Sobel on a replicated border, L1 magnitude,
    non-maximum suppression, hysteresis) of a one-channel ``[H, W]`` image on the 0..255
    scale (uint8, or integer values in a float tensor). Bool ``[H, W]``: the edge pixels."""
    m = _tensor(image).to(torch.float64)
    if m.ndim != 2:
        raise InputError(f"Canny needs a one-channel image [height, width]; got shape {list(m.shape)}.")
    low, high = math.floor(min(low, high)), math.floor(max(low, high))
    dx, dy = _sobel(m[None, None], "replicate")
    dx, dy = dx[0, 0], dy[0, 0]
    mag = dx.abs() + dy.abs()
    p = F.pad(mag, (1, 1, 1, 1))        # zero magnitude outside the image

    def at(oy: int, ox: int) -> torch.Tensor:
        h, w = mag.shape
        return p[1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ax, ay = dx.abs(), dy.abs()
    tan22 = math.tan(math.pi / 8)
    horizontal = ay < ax * tan22                       # gradient along x: compare left/right
    vertical = ay > ax * (tan22 + 2.0)                 # tan(67.5°) = tan(22.5°) + 2
    diag_sign = torch.where((dx * dy) < 0, -1, 1)
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    # diagonal: neighbours (y-1, x-s) and (y+1, x+s), both strictly smaller
    keep_d_pos = (mag > at(-1, -1)) & (mag > at(1, 1))
    keep_d_neg = (mag > at(-1, 1)) & (mag > at(1, -1))
    keep_d = torch.where(diag_sign > 0, keep_d_pos, keep_d_neg)
    keep = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    weak = keep & (mag > low)
    edges = weak & (mag > high)
    # hysteresis: weak pixels 8-connected (through weak pixels) to a strong one
    while True:
        grown = weak & (F.max_pool2d(edges[None, None].to(torch.float32), 3, stride=1, padding=1)[0, 0] > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def mask_boundary(mask: Array, raw: bool = False) -> torch.Tensor:
    """The mask's boundary pixels exactly as OpenCV's ``Canny(mask_0_255, 100, 200)`` marks
    them, bool ``[H, W]``: of the binarised mask (default; every non-zero magnitude of a 0/255
    image is above both thresholds), or with ``raw`` of the mask as given (a grey-level mask
    rounded to 0..255, as the MISATO Grad script runs Canny on the mask file)."""
    m = _as64(mask) * 255.0 if raw else binarise(mask).to(torch.float64) * 255.0
    return canny(torch.round(m) if raw else m)


def grad(result: Array, truth: Array, mask: Array, soft: bool = False) -> float:
    """The boundary gradient score. ``soft`` (the MISATO protocol): the result is blended
    into the ground truth by the mask's grey level, ``result * m + truth * (1 - m)``, and the
    boundary is Canny of the mask as given, as the official Grad script does; default: pasted
    by the binarised mask and the binarised mask's boundary (the same for a 0/1 mask)."""
    gt = _image(truth, "ground truth")
    m = _mask(mask, gt.shape[:2])
    if soft:
        r = _image(result, "result")
        if r.shape != gt.shape:
            raise InputError(f"The result is {list(r.shape)} but the ground truth is {list(gt.shape)}.")
        w = (torch.round(m * 255.0) / 255.0)[..., None]
        pred = r * w + gt * (1 - w)
    else:
        pred = paste(result, truth, m)
    edges = mask_boundary(m, raw=soft)
    if not edges.any():
        return 0.0
    x = torch.cat([pred, gt], -1).movedim(-1, 0)[:, None] * 255.0      # [6, 1, H, W]
    gx, gy = _sobel(x, "reflect")
    ddx, ddy = gx[:3, 0] - gx[3:, 0], gy[:3, 0] - gy[3:, 0]
    magnitude = torch.sqrt(ddx ** 2 + ddy ** 2)                         # [3, H, W]
    return magnitude[:, edges].mean(dim=1).mean().item()


# ------------------------------------------------------------------------------ colour

def rgb_to_lab(rgb: Array) -> torch.Tensor:
    """sRGB ``[..., 3]`` in 0..1 -> CIE L*a*b* (D65, 2° observer), float64."""
    x = _as64(rgb)
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = lin @ _RGB_TO_XYZ.t() / _D65
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], -1)


def ciede2000(lab1: Array, lab2: Array) -> torch.Tensor:
    """CIEDE2000 colour difference of Lab arrays ``[..., 3]`` (kL = kC = kH = 1)."""
    l1, a1, b1 = _tensor(lab1).to(torch.float64).unbind(-1)
    l2, a2, b2 = _tensor(lab2).to(torch.float64).unbind(-1)
    c1, c2 = torch.hypot(a1, b1), torch.hypot(a2, b2)
    cbar7 = ((c1 + c2) / 2) ** 7
    g = 0.5 * (1 - torch.sqrt(cbar7 / (cbar7 + 25.0 ** 7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.remainder(torch.atan2(b1, a1p), 2 * math.pi)
    h2p = torch.remainder(torch.atan2(b2, a2p), 2 * math.pi)
    zero = (c1p * c2p) == 0

    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > math.pi, dh - 2 * math.pi, torch.where(dh < -math.pi, dh + 2 * math.pi, dh))
    dh = torch.where(zero, torch.zeros_like(dh), dh)
    dH = 2 * torch.sqrt(c1p * c2p) * torch.sin(dh / 2)

    lbar = (l1 + l2) / 2
    cbarp = (c1p + c2p) / 2
    hsum = h1p + h2p
    hbar = torch.where((h1p - h2p).abs() > math.pi,
                       torch.where(hsum < 2 * math.pi, (hsum + 2 * math.pi) / 2, (hsum - 2 * math.pi) / 2),
                       hsum / 2)
    hbar = torch.where(zero, hsum, hbar)
    t = (1 - 0.17 * torch.cos(hbar - math.radians(30)) + 0.24 * torch.cos(2 * hbar)
         + 0.32 * torch.cos(3 * hbar + math.radians(6)) - 0.20 * torch.cos(4 * hbar - math.radians(63)))
    dtheta = math.radians(30) * torch.exp(-(((torch.rad2deg(hbar) - 275) / 25) ** 2))
    cbarp7 = cbarp ** 7
    rc = 2 * torch.sqrt(cbarp7 / (cbarp7 + 25.0 ** 7))
    sl = 1 + 0.015 * (lbar - 50) ** 2 / torch.sqrt(20 + (lbar - 50) ** 2)
    sc = 1 + 0.045 * cbarp
    sh = 1 + 0.015 * cbarp * t
    rt = -torch.sin(2 * dtheta) * rc
    return torch.sqrt((dl / sl) ** 2 + (dc / sc) ** 2 + (dH / sh) ** 2 + rt * (dc / sc) * (dH / sh))


def seam_bands(mask: Array, band: int = SEAM_BAND) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, outside) bool ``[H, W]``: hole pixels within ``band`` px (chessboard distance)
    of a kept pixel, and kept pixels within ``band`` px of the hole."""
    hole = binarise(mask)
    k = 2 * band + 1

    def grow(b: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(b[None, None].float(), k, stride=1, padding=band)[0, 0] > 0

    return hole & grow(~hole), ~hole & grow(hole)


def seam(result: Array, truth: Array, mask: Array, band: int = SEAM_BAND) -> float:
    gt = _image(truth, "ground truth")
    m = _mask(mask, gt.shape[:2])
    inside, outside = seam_bands(m, band)
    if not inside.any() or not outside.any():
        return 0.0
    pred = paste(result, truth, m)

    def step(img: torch.Tensor) -> torch.Tensor:
        return rgb_to_lab(img[inside]).mean(0) - rgb_to_lab(img[outside]).mean(0)

    return torch.linalg.vector_norm(step(pred) - step(gt)).item()


def unmasked_de2000(result: Array, truth: Array, mask: Array) -> float:
    r, gt = _image(result, "result"), _image(truth, "ground truth")
    if r.shape != gt.shape:
        raise InputError(f"The result is {list(r.shape)} but the ground truth is {list(gt.shape)}.")
    keep = ~binarise(_mask(mask, gt.shape[:2]))
    if not keep.any():
        return 0.0
    return ciede2000(rgb_to_lab(r[keep]), rgb_to_lab(gt[keep])).mean().item()


def score(result: Array, truth: Array, mask: Array, metrics=METRICS) -> dict[str, float]:
    """Every offline metric of one pair: ``{name: value}``."""
    fns = {"psnr": psnr, "ssim": ssim, "grad": grad, "seam": seam, "unmasked_de2000": unmasked_de2000}
    unknown = [m for m in metrics if m not in fns]
    if unknown:
        raise InputError(f"Unknown metrics {unknown}; available: {list(fns)}.")
    return {m: fns[m](result, truth, mask) for m in metrics}


# ------------------------------------------------------------------------------ summaries

# two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def mean_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95 % confidence interval (Student's t; for more
    than 30 values the normal 1.96). One value: the interval is the value itself; none: NaNs."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    m = float(v.mean())
    if v.size == 1:
        return (m, m, m)
    t = _T975[v.size - 2] if v.size - 1 <= len(_T975) else 1.96
    half = t * float(v.std(ddof=1)) / math.sqrt(v.size)
    return (m, m - half, m + half)


# ------------------------------------------------------------------------------ features

def _cov_factor(x: torch.Tensor) -> torch.Tensor:
    """A matrix ``A`` with ``A.T @ A`` = the sample covariance of ``x`` ``[N, D]``: the centred
    samples over sqrt(N - 1) when N <= D, else the symmetric square root of the covariance."""
    n, d = x.shape
    centred = (x - x.mean(0)) / math.sqrt(n - 1)
    if n <= d:
        return centred
    ev, evec = torch.linalg.eigh(centred.t() @ centred)
    return (evec * ev.clamp_min(0).sqrt()) @ evec.t()


def frechet_distance(real: Array, fake: Array) -> float:
    """FID between two feature sets ``[N, D]``: ``|mu_r - mu_f|² + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^½)``.
    With ``S = A.T A``, ``tr((S_r S_f)^½)`` is the sum of the singular values of ``A_r A_f.T``
    (the eigenvalues of ``S_r S_f`` are their squares), which stays exact and real when the
    covariances are singular (fewer samples than dimensions)."""
    r, f = _as64(real), _as64(fake)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1] or min(r.shape[0], f.shape[0]) < 2:
        raise InputError(f"FID needs two feature sets [N >= 2, D] of the same width; got "
                         f"{list(r.shape)} and {list(f.shape)}.")
    ar, af = _cov_factor(r), _cov_factor(f)
    cross = torch.linalg.svdvals(ar @ af.t()).sum()
    mean_term = ((r.mean(0) - f.mean(0)) ** 2).sum()
    return (mean_term + (ar * ar).sum() + (af * af).sum() - 2 * cross).item()


def pca_project(x: Array, dim: int, seed: int = 0) -> torch.Tensor:
    """``x`` ``[N, D]`` centred and projected on ``dim`` principal axes, as scikit-learn's
    ``PCA(dim, random_state=seed).fit_transform(x)`` computes it with its default solver:
    when ``dim < 0.8 min(N, D)`` (and ``max(N, D) > 500``) Halko's randomized SVD (``dim``
    + 10 Gaussian test vectors drawn by ``numpy.random.RandomState(seed)``, 4 power
    iterations, 7 when ``dim < 0.1 min(N, D)``, each normalised by a pivoted LU, a final QR),
    otherwise the exact SVD. Computed in the dtype of ``x`` (float32 features stay float32,
    as scikit-learn keeps them). Axes' signs may differ from scikit-learn's; nothing
    downstream (a linear SVM with an L2 penalty) depends on them."""
    t = _tensor(x)
    t = t.to(torch.float32 if t.dtype == torch.float32 else torch.float64)
    if t.ndim != 2:
        raise InputError(f"PCA needs a feature set [N, D]; got shape {list(t.shape)}.")
    n, d = t.shape
    if not 1 <= dim <= min(n, d):
        raise InputError(f"PCA to {dim} dimensions needs at least {dim} samples and features; got {n} x {d} "
                         f"(the MISATO protocol's IDS at {dim} needs {(dim + 1) // 2} image pairs or more).")
    a = t - t.mean(0)
    if max(n, d) <= 500 or dim >= 0.8 * min(n, d):
        u, sv, _ = torch.linalg.svd(a, full_matrices=False)
        return u[:, :dim] * sv[:dim]
    n_iter = 7 if dim < 0.1 * min(n, d) else 4
    transpose = n < d
    m = a.t() if transpose else a
    q = torch.from_numpy(np.random.RandomState(seed).normal(size=(m.shape[1], dim + 10))).to(t.dtype)

    def lu(b: torch.Tensor) -> torch.Tensor:      # the permuted L factor of b = P L U
        perm, low, _ = torch.linalg.lu(b)
        return perm @ low

    for _ in range(n_iter):
        q = lu(m @ q)
        q = lu(m.t() @ q)
    q = torch.linalg.qr(m @ q, mode="reduced").Q
    uhat, sv, vt = torch.linalg.svd(q.t() @ m, full_matrices=False)
    u = vt[:dim].t() if transpose else (q @ uhat)[:, :dim]
    return u * sv[:dim]


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for a symmetric positive definite ``a``: Cholesky, or LU where rounding made
    ``a`` numerically indefinite."""
    low, info = torch.linalg.cholesky_ex(a)
    if info.item() == 0:
        return torch.cholesky_solve(b[:, None], low)[:, 0]
    return torch.linalg.solve(a, b)


def linear_svm(x: Array, y: Array, c: float = 1.0, iters: int = 100) -> torch.Tensor:
    """The L2-regularised squared-hinge linear SVM in its primal, as liblinear solves it for
    scikit-learn's ``LinearSVC(dual=False)``: minimise ``½|w|² + C Σ max(0, 1 - y_i w·[x_i, 1])²``
    (the bias is the weight of a constant feature 1 and is penalised too). ``y`` is ±1.
    Solved to its optimum by Newton's method on the active set (the objective is piecewise
    quadratic: once the set of margin violators is right, one Newton step is exact) with a
    backtracking line search. Returns ``w`` ``[D + 1]`` (the bias last), float64."""
    xb = _as64(x)
    xb = torch.cat([xb, torch.ones(len(xb), 1, dtype=torch.float64)], 1)
    yy = _as64(y)
    w = torch.zeros(xb.shape[1], dtype=torch.float64)
    eye = torch.eye(xb.shape[1], dtype=torch.float64)

    def objective(v: torch.Tensor) -> float:
        return (0.5 * v @ v + c * ((1 - yy * (xb @ v)).clamp_min(0) ** 2).sum()).item()

    g0 = None
    f = objective(w)
    for _ in range(iters):
        z = xb @ w
        active = yy * z < 1
        xa = xb[active]
        g = w + 2 * c * xa.t() @ (z[active] - yy[active])
        gn = torch.linalg.vector_norm(g).item()
        g0 = gn if g0 is None else g0
        if gn <= 1e-12 * max(g0, 1.0):
            break
        # the Newton point: the minimum of the quadratic on this active set,
        # (I + 2C Xaᵀ Xa) w = 2C Xaᵀ ya; with fewer violators than weights in its
        # push-through form w = Xaᵀ (Xa Xaᵀ + I / 2C)⁻¹ ya (smaller, no cancellation)
        if len(xa) < xb.shape[1]:
            target = xa.t() @ _spd_solve(xa @ xa.t() + torch.eye(len(xa), dtype=torch.float64) / (2 * c), yy[active])
        else:
            target = _spd_solve(eye + 2 * c * xa.t() @ xa, 2 * c * xa.t() @ yy[active])
        step = target - w
        slope = (g @ step).item()
        if not slope < 0:               # rounding on features of huge scale: fall back to the gradient
            step, slope = -g, -gn * gn
        t = 1.0
        while True:
            trial = w + t * step
            ft = objective(trial)
            if ft <= f + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        if f - ft <= 1e-15 * max(abs(f), 1.0) and t < 1e-10:
            break
        w, f = trial, ft
    return w


def discriminative_scores(real: Array, fake: Array, c: float = 1.0, iters: int = 100,
                          pca_dim: int | None = None, seed: int = 0) -> tuple[float, float]:
    """(U-IDS, P-IDS) of Co-Mod-GAN, as the ASUKA (MISATO) evaluation computes them: the real
    and fake features, stacked, are reduced by ``pca_project`` to ``pca_dim`` dimensions
    (the MISATO protocol: 512 for the 512 px set, 1024 for the 1K set; ``None`` keeps them);
    ``linear_svm`` (squared hinge, L2, ``C``, penalised bias) separates real (+1) from fake
    (-1); U-IDS is its training misclassification rate (a score of exactly 0 counts as
    fake), P-IDS the fraction of pairs whose fake scores higher than its real counterpart.
    ``real[i]`` and ``fake[i]`` are one pair (the ground truth and its inpainted version).
    ``seed`` seeds the randomized PCA (scikit-learn's ``random_state``)."""
    r, f = _tensor(real), _tensor(fake)
    if r.shape != f.shape or r.ndim != 2:
        raise InputError(f"IDS needs paired feature sets of the same shape; got {list(r.shape)}, {list(f.shape)}.")
    x = torch.cat([r, f])
    if pca_dim is not None and pca_dim != x.shape[1]:
        x = pca_project(x, pca_dim, seed)
    y = torch.cat([torch.ones(len(r)), -torch.ones(len(f))]).to(torch.float64)
    w = linear_svm(x, y, c=c, iters=iters)
    d = _as64(x) @ w[:-1] + w[-1]
    u = ((d > 0) != (y > 0)).to(torch.float64).mean().item()
    p = (d[len(r):] > d[:len(r)]).to(torch.float64).mean().item()
    return u, p


# ------------------------------------------------------------------------------ CLIP score

def clip_inputs(result: Array, truth: Array, mask: Array) -> tuple[np.ndarray, np.ndarray]:
    """The two images the MISATO CLIP score compares: the result and the ground truth, each
    kept only inside the hole (black elsewhere). As the official script, the hole is the
    pixels whose mask is exactly 255 (``mask // 255`` on the 0..255 grey levels; float
    masks are 0..1 and rounded). uint8 ``[H, W, 3]`` each."""
    r = np.asarray(result)
    g = np.asarray(truth)
    if r.dtype != np.uint8 or g.dtype != np.uint8 or r.shape != g.shape or r.ndim != 3:
        raise InputError(f"The CLIP score takes two uint8 RGB images of one size; got {r.dtype} {list(r.shape)} "
                         f"and {g.dtype} {list(g.shape)}.")
    m = np.asarray(mask)
    m = m.astype(np.uint8) * 255 if m.dtype == bool else (
        m if m.dtype == np.uint8 else np.clip(np.rint(m.astype(np.float64) * 255), 0, 255).astype(np.uint8))
    if m.shape != r.shape[:2]:
        raise InputError(f"The mask is {list(m.shape)} but the image is {list(r.shape[:2])}: they must match.")
    hole = (m // 255)[..., None]
    return r * hole, g * hole


def clip_score(result_features: Array, truth_features: Array) -> float:
    """Mean over pairs of the cosine similarity between the CLIP image embeddings of
    ``clip_inputs``' two images, ``[N, D]`` each (pair ``i`` in row ``i``). This is what the
    official script evidently means: as published it averages each normalised embedding to
    one number before taking the diagonal of their products, which scores
    ``mean(a_i) * mean(b_i)`` instead of ``a_i · b_i``."""
    a, b = _as64(result_features), _as64(truth_features)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"The CLIP score needs paired embeddings of one shape; got {list(a.shape)}, {list(b.shape)}.")
    a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True)
    b = b / torch.linalg.vector_norm(b, dim=1, keepdim=True)
    return (a * b).sum(1).mean().item()
