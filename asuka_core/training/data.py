"""Training images from a folder: checked up front, split into training and held-out
sets, cropped to a square of the training resolution.

Every image is opened once when the set is built, so an unreadable or tiny file is an
``InputError`` that names it before any training starts. Images are then read again on
demand (nothing is kept in memory). Each sample is a function of ``(seed, index)``: a
random square crop (at least ``min_crop`` of the shorter side), resized to
``resolution`` and flipped half of the time. Held-out images are always centre-cropped
and never flipped, so the validation loss is comparable from one evaluation to the next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_IMAGES = 2  # at least one to train on and one held out


def list_images(folder: str) -> list[str]:
    """Every image file under ``folder`` (recursively), sorted."""
    if not folder or not os.path.isdir(folder):
        raise InputError(f"Image folder '{folder}' does not exist. Give a folder of photos (png, jpg, webp).")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _check_image(path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as e:  # PIL raises many types for broken files
        raise InputError(f"Could not read training image '{path}': {e}. Remove or replace the file.") from None


def load_image(path: str) -> np.ndarray:
    """``[H, W, 3]`` uint8, RGB (grey and alpha converted)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _crop_resize(arr: np.ndarray, top: int, left: int, side: int, resolution: int) -> torch.Tensor:
    from PIL import Image

    crop = Image.fromarray(arr[top:top + side, left:left + side])
    if side != resolution:
        crop = crop.resize((resolution, resolution), Image.Resampling.BICUBIC if side < resolution
                           else Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(crop).astype(np.float32) / 255.0)


@dataclass
class ImageSet:
    """A list of checked image files. ``sample(i, seed)`` -> IMAGE ``[H, W, 3]`` 0..1."""

    paths: list[str]
    resolution: int
    augment: bool = True
    min_crop: float = 0.7

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int, seed: int = 0) -> torch.Tensor:
        arr = load_image(self.paths[index % len(self.paths)])
        h, w = arr.shape[:2]
        short = min(h, w)
        if not self.augment:
            side = short
            return _crop_resize(arr, (h - side) // 2, (w - side) // 2, side, self.resolution)
        rng = np.random.default_rng([int(seed), int(index), 7])
        side = int(round(short * rng.uniform(self.min_crop, 1.0)))
        side = max(1, min(side, short))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out = _crop_resize(arr, top, left, side, self.resolution)
        if rng.random() < 0.5:
            out = out.flip(1)
        return out

    def batch(self, indices: Sequence[int], seed: int = 0) -> torch.Tensor:
        return torch.stack([self.sample(i, seed) for i in indices])


def image_sets(folder: str, resolution: int, *, holdout: float = 0.05, max_holdout: int = 16,
               seed: int = 0, min_side: int | None = None) -> tuple[ImageSet, ImageSet]:
    """Check every image in ``folder`` and split it into (training, held-out) sets.

    ``holdout``: share of the images kept for the validation loss and the sample images
    (at least 1, at most ``max_holdout``). Images whose shorter side is under
    ``min_side`` (default half the resolution) are refused: upscaled crops would teach
    the aligner blur.
    """
    if resolution < 64 or resolution % 64:
        raise InputError(f"Training resolution must be a multiple of 64 (at least 64); got {resolution}.")
    paths = list_images(folder)
    if not paths:
        raise InputError(
            f"No images in '{folder}' (looked for {', '.join(IMAGE_EXTENSIONS)}, also in sub-folders). "
            "Put the training photos there.")
    if len(paths) < MIN_IMAGES:
        raise InputError(f"Only {len(paths)} image in '{folder}'; training needs at least {MIN_IMAGES} "
                         "(one is held out for validation), and hundreds to generalise.")
    min_side = resolution // 2 if min_side is None else min_side
    small = []
    for p in paths:
        w, h = _check_image(p)
        if min(w, h) < min_side:
            small.append(f"{os.path.basename(p)} ({w}x{h})")
    if small:
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        raise InputError(
            f"{len(small)} training image(s) are smaller than {min_side} px on their shorter side: "
            f"{', '.join(small[:5])}{more}. Remove them or lower the resolution.")
    n_val = int(min(max_holdout, max(1, round(holdout * len(paths)))))
    n_val = min(n_val, len(paths) - 1)
    order = np.random.default_rng([int(seed), 99]).permutation(len(paths))
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return (ImageSet([paths[i] for i in train], resolution, augment=True),
            ImageSet([paths[i] for i in val], resolution, augment=False))
