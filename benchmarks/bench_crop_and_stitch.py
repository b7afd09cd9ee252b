"""How much of the picture outside the hole an Inpaint-CropAndStitch round trip changes.

Inpaint Crop resizes the context crop (and its mask) to the sampling size; Inpaint Stitch
resizes the mask back and pastes ``m * inpainted + (1 - m) * original``. Every pixel where
that round-tripped mask is above 0 takes part of the fill, so a resize lets the fill leak a
little past the hole, and ``mask_blend_pixels`` grows and blurs the hole on purpose. This
script redoes the mask's path with PIL's resize filters (as the pack resizes: 8-bit 'L'
images) for typical sizes and prints, per case, the pixels outside the hole that change,
how far from the hole they reach, the largest weight the fill gets there, and the share of
the hole where the original still shows through (weight < 0.9).

    scripts/host.sh python benchmarks/bench_crop_and_stitch.py

No CropAndStitch code is run or needed: it models the documented steps (see
docs/crop-and-stitch.md).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import distance_transform_edt, gaussian_filter, grey_dilation

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}


def blob(size: tuple[int, int]) -> np.ndarray:
    """A painted-looking hole (an ellipse plus a stroke), 1 = hole, in the middle third."""
    w, h = size
    im = Image.new("L", size, 0)
    d = ImageDraw.Draw(im)
    d.ellipse((w * 0.33, h * 0.3, w * 0.62, h * 0.7), fill=255)
    d.line((w * 0.45, h * 0.5, w * 0.7, h * 0.62), fill=255, width=max(2, w // 20))
    return np.asarray(im) / 255.0


def resize_mask(mask: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    # torchvision's to_pil_image: float -> x255 -> byte (truncates) -> 'L'; to_tensor: /255
    im = Image.fromarray((mask * 255).astype(np.uint8), "L").resize(size, FILTERS[method])
    return np.asarray(im) / 255.0


def blend_prepare(mask: np.ndarray, blend: int) -> np.ndarray:
    """mask_blend_pixels > 0: grow (square, ceil(1.5 * blend/4 + 1) px) and blur (sigma blend/8)."""
    if blend <= 0:
        return mask
    k = int(np.ceil(blend / 4 * 1.5 + 1))
    return np.clip(gaussian_filter(grey_dilation(mask, footprint=np.ones((k, k))), blend * 0.5 / 4), 0, 1)


def round_trip(context: tuple[int, int], target: tuple[int, int], down: str, up: str, blend: int) -> dict:
    hole = blob(context)
    mask = blend_prepare(hole, blend)
    grow = target[0] > context[0] or target[1] > context[1]
    m = resize_mask(mask, target, up if grow else down)                      # Inpaint Crop
    if blend > 0:
        m = np.clip(gaussian_filter(m, blend * 0.5 / 4), 0, 1)                # the blend mask's extra blur
    back = resize_mask(m, context, down if grow else up)                     # Inpaint Stitch
    outside = hole < 0.5
    changed = outside & (back > 0)
    dist = distance_transform_edt(outside)
    return {
        "changed": int(changed.sum()),
        "reach_px": float(dist[changed].max()) if changed.any() else 0.0,
        "max_weight": float(back[outside].max()),
        "hole_pct_partial": 100.0 * ((hole >= 0.5) & (back < 0.9)).sum() / (hole >= 0.5).sum(),
    }


CASES = [
    ("context 512x512 = target (no resize)", (512, 512), (512, 512)),
    ("context 360x360 -> 512 (upscaled)", (360, 360), (512, 512)),
    ("context 840x840 -> 512 (downscaled)", (840, 840), (512, 512)),
    ("context 1700x1700 -> 1024 (FLUX)", (1700, 1700), (1024, 1024)),
    ("resize off, padding 32: 241x361 -> 256x384", (241, 361), (256, 384)),
]


def main() -> None:
    print(f"{'case':46s} {'down/up':17s} {'blend':>5s} {'changed px':>10s} "
          f"{'reach px':>8s} {'max weight':>10s} {'hole % <0.9':>12s}")
    for label, context, target in CASES:
        for down, up in (("bilinear", "bicubic"), ("nearest", "nearest")):
            for blend in (0, 32):
                r = round_trip(context, target, down, up, blend)
                print(f"{label:46s} {down + '/' + up:17s} {blend:5d} {r['changed']:10d} "
                      f"{r['reach_px']:8.1f} {r['max_weight']:10.3f} {r['hole_pct_partial']:12.1f}")


if __name__ == "__main__":
    main()
