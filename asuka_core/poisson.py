"""Poisson (gradient-domain) blending: OpenCV's ``seamlessClone(NORMAL_CLONE)`` in PyTorch,
and HD-Painter's ``poisson_blend`` built on it.

The pack does not depend on OpenCV, so the solver is re-derived here from the discrete
problem that ``cv2.seamlessClone`` solves (OpenCV 4.x, ``modules/photo``), on float
tensors instead of 8-bit images:

1. The mask's outer 1-pixel ring is cleared; the work region R is the bounding box of the
   remaining non-zero mask pixels (OpenCV's ``boundingRect``). Nothing outside R changes.
2. The guidance weight w is the mask eroded by a 3x3 square three times (a 7x7 minimum
   filter), with the mask taken as zero outside R. A soft mask gives a soft weight.
3. Guidance field on R: ``G = (1 - w) * grad(target) + w * grad(source)`` with forward
   differences (``grad_x I(y, x) = I(y, x + 1) - I(y, x)``); the source counts only where
   the mask is non-zero.
4. On the interior of R (R minus its 1-pixel ring) the result u solves the 5-point Poisson
   equation ``lap(u) = div(G)`` (backward differences for div), with u = target on the
   ring (Dirichlet). Written for the difference d = u - target this is
   ``lap(d) = div(w * grad(source - target))``, d = 0 on the ring, which is solved exactly
   with a 2-D type-I discrete sine transform (eigenvalues ``2cos(pi k/(W-1)) +
   2cos(pi j/(H-1)) - 4``), the same discretisation and boundary handling as OpenCV.

Differences from OpenCV: the solve runs in float64 instead of float32, and the result is
not quantised (OpenCV truncates to uint8, so its pixels are ``floor`` of the values here,
up to its float32 rounding). The placement is in place: the patch stays where it is in
the source, which is what ``seamlessClone(src, dst, mask, p, NORMAL_CLONE)`` does for
images of equal size when ``p`` is the centre ``(x + w // 2, y + h // 2)`` of R.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError

ERODE_SIZE = 7  # OpenCV: erode with a 3x3 square, 3 iterations


def _check(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
    if source.ndim != 4 or target.shape != source.shape:
        raise InputError(
            f"Poisson blend needs two images of the same size; got {list(source.shape)} and "
            f"{list(target.shape)} ([B, C, H, W]). Resize the generated image to the original's size first.")
    if mask.ndim != 3 or mask.shape[-2:] != source.shape[-2:]:
        raise InputError(
            f"the blend mask is {list(mask.shape[-2:])} but the images are {list(source.shape[-2:])}: "
            "give a mask of the same size as the images.")
    if mask.shape[0] not in (1, source.shape[0]):
        raise InputError(f"{mask.shape[0]} masks for {source.shape[0]} images: give one mask, or one per image.")


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1), end-exclusive, of the non-zero pixels of a [H, W] mask; None if empty."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _dst1(x: torch.Tensor) -> torch.Tensor:
    """Type-I DST along the last axis: X_k = sum_n x_n sin(pi n k / (N + 1)), n, k = 1..N."""
    n = x.shape[-1]
    ext = torch.zeros(*x.shape[:-1], 2 * n + 2, dtype=x.dtype, device=x.device)
    ext[..., 1:n + 1] = x
    ext[..., n + 2:] = -x.flip(-1)
    return -torch.fft.rfft(ext, dim=-1)[..., 1:n + 1].imag / 2


def _dst2(x: torch.Tensor) -> torch.Tensor:
    return _dst1(_dst1(x).transpose(-1, -2)).transpose(-1, -2)


def solve_dirichlet(rhs: torch.Tensor) -> torch.Tensor:
    """d with ``lap5(d) = rhs`` on an [.., h, w] interior grid and d = 0 just outside it."""
    h, w = rhs.shape[-2:]
    ky = torch.arange(1, h + 1, dtype=rhs.dtype, device=rhs.device)
    kx = torch.arange(1, w + 1, dtype=rhs.dtype, device=rhs.device)
    eig = (2 * torch.cos(torch.pi * ky / (h + 1)))[:, None] + (2 * torch.cos(torch.pi * kx / (w + 1)))[None, :] - 4
    # the DST-I is its own inverse up to the factor 2 / (N + 1) per axis
    return _dst2(_dst2(rhs) / eig) * (4.0 / ((h + 1) * (w + 1)))


def guidance_weight(mask_roi: torch.Tensor) -> torch.Tensor:
    """OpenCV's eroded mask on the work region: 7x7 minimum filter, zero outside the region."""
    pad = ERODE_SIZE // 2
    return -F.max_pool2d(F.pad(-mask_roi[None, None], (pad,) * 4, value=0.0), ERODE_SIZE, stride=1)[0, 0]


def _clone_one(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """source/target [C, H, W], mask [H, W] in [0, 1]."""
    mask = mask.clone()
    mask[0, :] = mask[-1, :] = 0
    mask[:, 0] = mask[:, -1] = 0
    box = bounding_box(mask > 0)
    out = target.clone()
    if box is None:
        return out
    y0, x0, y1, x1 = box
    if y1 - y0 < 3 or x1 - x0 < 3:   # no interior: the ring is kept, so nothing changes
        return out
    m = mask[y0:y1, x0:x1].double()
    dst = target[:, y0:y1, x0:x1].double()
    src = torch.where(m > 0, source[:, y0:y1, x0:x1].double(), torch.zeros((), dtype=torch.float64))
    w = guidance_weight(m)
    diff = src - dst
    gx = w[:, :-1] * (diff[:, :, 1:] - diff[:, :, :-1])   # forward differences at x = 0..W-2
    gy = w[:-1, :] * (diff[:, 1:, :] - diff[:, :-1, :])
    # backward-difference divergence at the interior pixels (1..H-2, 1..W-2)
    div = (gx[:, 1:-1, 1:] - gx[:, 1:-1, :-1]) + (gy[:, 1:, 1:-1] - gy[:, :-1, 1:-1])
    d = solve_dirichlet(div)
    out[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1] = (dst[:, 1:-1, 1:-1] + d).to(out.dtype)
    return out


def seamless_clone(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste ``source`` into ``target`` where ``mask`` > 0, in the gradient domain.

    source, target: [B, C, H, W] float (any value range); mask: [B or 1, H, W] in [0, 1].
    Returns [B, C, H, W] in the target's dtype, unclamped. Pixels outside the mask's bounding
    box (and on its 1-pixel ring) are exactly the target's.
    """
    _check(source, target, mask)
    mask = mask.to(source.device).float().clamp(0, 1)
    outs = [_clone_one(source[i], target[i], mask[min(i, mask.shape[0] - 1)]) for i in range(source.shape[0])]
    return torch.stack(outs)


def dilate_box(mask: torch.Tensor, size: int) -> torch.Tensor:
    """``cv2.dilate(mask, np.ones((size, size)))`` of a mask >= 0 ([B, H, W]): maximum over a
    size x size window with OpenCV's anchor (the window spans ``-(size // 2) .. size - 1 -
    size // 2``), zero outside. Only the bounding box of the non-zero pixels grown by the
    window is computed (the window maximum is 0 elsewhere): the cost follows the hole, not
    the picture."""
    if size <= 1:
        return mask
    lo = size // 2
    hi = size - 1 - lo
    out = torch.zeros_like(mask)
    box = bounding_box((mask > 0).any(dim=0))
    if box is None:
        return out
    h, w = mask.shape[-2:]
    y0, x0 = max(0, box[0] - hi), max(0, box[1] - hi)
    y1, x1 = min(h, box[2] + lo), min(w, box[3] + lo)
    padded = F.pad(mask[:, None], (lo, hi, lo, hi), value=0.0)   # padded[p + lo] = mask[p]
    window = padded[..., y0:y1 + size - 1, x0:x1 + size - 1]
    # a square's maximum is the maximum over rows of the maximum over columns: two 1-D passes
    rows = F.max_pool2d(window, (1, size), stride=1)
    out[:, y0:y1, x0:x1] = F.max_pool2d(rows, (size, 1), stride=1)[:, 0]
    return out


def hd_painter_blend(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, *,
                     pad: int = 32, dilation: int = 48) -> torch.Tensor:
    """HD-Painter's final blend (``src/utils.poisson_blend``): both images reflect-padded by
    ``pad``, the padded border of the original replaced by the generated image's, the mask
    zero-padded and dilated with a ``dilation`` x ``dilation`` box, seamless clone of the
    generated image into the original, padding cropped.

    original, generated: [B, C, H, W]; mask: [B or 1, H, W] in [0, 1] (1 = regenerated).
    Pixels outside the bounding box of the dilated mask, and on its 1-pixel ring, keep the
    original exactly; inside the box the whole rectangle is re-solved (OpenCV's behaviour).
    When that box (+1 px) lies inside the picture, only it is processed (``blend_window``):
    the padding cannot reach it, so the result is the same and the cost follows the hole.
    """
    _check(generated, original, mask)
    h, w = original.shape[-2:]
    if pad > 0 and (pad >= h or pad >= w):
        raise InputError(f"the image ({w}x{h}) is too small for a {pad}-pixel blend padding: "
                         "lower the padding or use a larger image.")
    mask = mask.to(original.device).float().clamp(0, 1)
    window = blend_window(mask, h, w, dilation)
    if window is not None:
        # Everything the solve reads or writes lies inside the window, away from the
        # padding: blend the window alone (same numbers) and keep the original around it.
        y0, x0, y1, x1 = window
        out = original.clone()
        out[..., y0:y1, x0:x1] = _blend_padded(original[..., y0:y1, x0:x1], generated[..., y0:y1, x0:x1],
                                               mask[..., y0:y1, x0:x1], 0, dilation)
        return out
    return _blend_padded(original, generated, mask, pad, dilation)


def blend_window(mask: torch.Tensor, h: int, w: int, dilation: int) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) of the pixels ``hd_painter_blend`` can change plus a 1-pixel ring:
    the bounding box of the mask (any sample) grown by the dilation window, + 1. None when
    it does not lie inside the picture (the padding then matters) or there is no hole."""
    box = bounding_box((mask > 0).any(dim=0))
    if box is None:
        return None
    lo = dilation // 2
    hi = dilation - 1 - lo
    y0, x0, y1, x1 = box[0] - hi - 1, box[1] - hi - 1, box[2] + lo + 1, box[3] + lo + 1
    if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
        return None
    return y0, x0, y1, x1


def _blend_padded(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, pad: int,
                  dilation: int) -> torch.Tensor:
    """The padded blend on whole pictures (see ``hd_painter_blend``)."""
    if pad > 0:
        gen_p = F.pad(generated, (pad,) * 4, mode="reflect")
        orig_p = F.pad(original, (pad,) * 4, mode="reflect").clone()
        inner = orig_p[..., pad:-pad, pad:-pad].clone()
        orig_p.copy_(gen_p)
        orig_p[..., pad:-pad, pad:-pad] = inner
        mask_p = F.pad(mask, (pad,) * 4, value=0.0)
    else:
        gen_p, orig_p, mask_p = generated, original, mask
    out = seamless_clone(gen_p, orig_p, dilate_box(mask_p, dilation))
    if pad > 0:
        out = out[..., pad:-pad, pad:-pad]
    return out


def check_mask_size(mask: torch.Tensor, image: torch.Tensor) -> None:
    """MASK [B, H, W] and IMAGE [B, H, W, C] of the original must have the same size (no
    silent resizing: a mask of another picture would blend the wrong area)."""
    if mask.shape[1:] != image.shape[1:3]:
        raise InputError(
            f"the mask is {mask.shape[2]}x{mask.shape[1]} but the image is {image.shape[2]}x{image.shape[1]}: "
            "give the original picture's mask, at the same size as the picture.")


def blend_images(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, *,
                 pad: int = 32, dilation: int = 48) -> torch.Tensor:
    """``hd_painter_blend`` on ComfyUI tensors: IMAGE ``[B, H, W, C]`` in 0..1 and MASK
    ``[B, H, W]`` (1 = regenerated). Sizes must match exactly; the result is clamped to 0..1."""
    from .imaging import to_image_batch, to_mask_batch

    original, generated, mask = to_image_batch(original), to_image_batch(generated), to_mask_batch(mask)
    if original.shape[1:3] != generated.shape[1:3]:
        raise InputError(
            f"the generated image is {generated.shape[2]}x{generated.shape[1]} but the original is "
            f"{original.shape[2]}x{original.shape[1]}: blend images of the same size (upscale or crop "
            "the generated one first).")
    check_mask_size(mask, original)
    batch = max(original.shape[0], generated.shape[0], mask.shape[0])
    for name, n in (("original images", original.shape[0]), ("generated images", generated.shape[0]),
                    ("masks", mask.shape[0])):
        if n not in (1, batch):
            raise InputError(f"{n} {name} for a batch of {batch}: give one, or one per image.")
    original = original.expand(batch, -1, -1, -1).movedim(-1, 1)
    generated = generated.expand(batch, -1, -1, -1).movedim(-1, 1).to(original.device)
    out = hd_painter_blend(original, generated, mask.to(original.device), pad=pad, dilation=dilation)
    return out.clamp(0, 1).movedim(1, -1)
