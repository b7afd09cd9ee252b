"""Training images from a folder: checked up front, split into training and held-out
sets, cropped to a square of the training resolution.

Every image is opened once when the set is built, so an unreadable or tiny file is an
``InputError`` that names it before any training starts. Images are then read again on
demand (nothing is kept in memory). Each sample is a function of ``(seed, index)``: a
random square crop (at least ``min_crop`` of the shorter side), resized to
``resolution`` and flipped half of the time. Held-out images are always centre-cropped
and never flipped, so the validation loss is comparable from one evaluation to the next.

With ``cache_dir`` an ``ImageSet`` reads each photo from a copy pre-scaled once to the
smallest size every crop still needs (shorter side ``ceil(resolution / min_crop)``,
Lanczos), written as PNG on first use: decoding a 4000x3000 JPEG costs about ten times
more than the whole crop from the copy. The crop is then taken from the copy, so the
pixels differ slightly (two resamplings) from a run without the cache; a run keeps its
setting (it is one of the settings a resume checks).

``BatchMaker`` draws one micro-batch (crops, masks, substitution flags, timesteps, noise)
as a function of ``(seed, step, micro, global sample index)`` alone; ``BatchStream`` runs
it in DataLoader worker processes with prefetch, in order, so the result is the same
with or without workers.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..masks import MaskGenerator
from .distributed import SINGLE, DistInfo, shard
from .schedule import substitution_probability

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


def rng_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def prescaled_side(resolution: int, min_crop: float) -> int:
    """Shorter side of a cached copy: the smallest crop (``min_crop`` of it) still has
    ``resolution`` pixels, so a crop from the copy is never upscaled."""
    return int(math.ceil(resolution / min_crop))


def prescaled_image(path: str, cache_dir: str, short_side: int) -> np.ndarray:
    """``load_image(path)`` scaled (Lanczos) to ``short_side`` on its shorter side, from
    ``cache_dir`` when there (keyed on the path, size, modification time and side),
    otherwise made and written there first. Images already that small are used as they are."""
    from PIL import Image

    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{short_side}".encode()).hexdigest()
    cached = os.path.join(cache_dir, key[:2], key[2:20] + ".png")
    if os.path.isfile(cached):
        try:
            return load_image(cached)
        except Exception:  # a half-written or damaged cache file: make it again
            pass
    arr = load_image(path)
    h, w = arr.shape[:2]
    if min(h, w) > short_side:
        scale = short_side / min(h, w)
        size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = f"{cached}.{os.getpid()}.tmp"
    Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, cached)
    return arr


@dataclass
class ImageSet:
    """A list of checked image files. ``sample(i, seed)`` -> IMAGE ``[H, W, 3]`` 0..1.
    ``cache_dir``: read pre-scaled copies from there (see the module docstring)."""

    paths: list[str]
    resolution: int
    augment: bool = True
    min_crop: float = 0.7
    cache_dir: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        path = self.paths[index % len(self.paths)]
        if self.cache_dir:
            return prescaled_image(path, self.cache_dir, prescaled_side(self.resolution, self.min_crop))
        return load_image(path)

    def sample(self, index: int, seed: int = 0) -> torch.Tensor:
        arr = self.read(index)
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
               seed: int = 0, min_side: int | None = None,
               cache_dir: str | None = None) -> tuple[ImageSet, ImageSet]:
    """Check every image in ``folder`` and split it into (training, held-out) sets.

    ``holdout``: share of the images kept for the validation loss and the sample images
    (at least 1, at most ``max_holdout``). Images whose shorter side is under
    ``min_side`` (default half the resolution) are refused: upscaled crops would teach
    the aligner blur. ``cache_dir``: the training set reads pre-scaled copies from there.
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
    return (ImageSet([paths[i] for i in train], resolution, augment=True, cache_dir=cache_dir),
            ImageSet([paths[i] for i in val], resolution, augment=False))


@dataclass
class BatchMaker:
    """One training micro-batch as a function of its number ``n = step * grad_accum +
    micro`` (picklable, so DataLoader workers can run it).

    The global batch of a micro-step has ``batch_size * world_size`` samples; this rank
    draws its shard (``distributed.shard``). Sample ``k``'s photo, crop, substitution
    flag, timestep and noise come from ``(seed, step, micro, k)``, its mask from the
    global sample number ``n * global_batch + k``: the union over the ranks is exactly the
    batch of a single process with ``batch_size * world_size``.
    """

    images: ImageSet
    masks: MaskGenerator
    batch_size: int
    grad_accum: int
    seed: int
    timesteps: int
    latent_shape: tuple                   # (channels, h, w) of one latent
    p_start: float = 1.0
    p_end: float = 0.1
    p_steps: int = 2000
    dist: DistInfo = SINGLE

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.dist.world_size

    def __call__(self, n: int) -> dict:
        step, micro = divmod(int(n), self.grad_accum)
        p = substitution_probability(step, self.p_start, self.p_end, self.p_steps)
        first = n * self.global_batch
        images, substitute, t, noise = [], [], [], []
        ks = list(shard(self.batch_size, self.dist))
        for k in ks:
            rng = np.random.default_rng([self.seed, step, micro, k, 1])
            pick = int(rng.integers(0, len(self.images)))
            substitute.append(bool(rng.random() < p))
            images.append(self.images.sample(pick, seed=rng_seed(self.seed, first + k)))
            gen = torch.Generator().manual_seed(rng_seed(self.seed, step, micro, k, 2))
            t.append(torch.randint(0, self.timesteps, (1,), generator=gen))
            noise.append(torch.randn(tuple(self.latent_shape), generator=gen))
        return {"images": torch.stack(images), "masks": self.masks.batch([first + k for k in ks]),
                "substitute": torch.tensor(substitute), "t": torch.cat(t), "noise": torch.stack(noise), "p": p,
                "n": int(n)}


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        n = self.start
        while True:
            yield n
            n += 1


class _Items(torch.utils.data.Dataset):
    def __init__(self, make: Callable[[int], dict]):
        self.make = make

    def __getitem__(self, n: int) -> dict:
        return self.make(n)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def workers_supported() -> bool:
    """DataLoader workers are started with ``fork`` (Linux): the pack's modules are
    imported under ComfyUI's package names, which a ``spawn``ed worker could not import."""
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class BatchStream:
    """``get(n)`` -> ``make(n)``. With ``workers > 0`` the items come from DataLoader
    worker processes that run ahead (``prefetch`` items each), in order from the first
    ``n`` asked for; asking out of order restarts them there. Same items either way."""

    def __init__(self, make: Callable[[int], dict], workers: int = 0, prefetch: int = 2):
        self.make = make
        self.workers = int(workers) if workers and workers_supported() else 0
        self.prefetch = max(1, int(prefetch))
        self._it = None
        self._next = None

    def get(self, n: int) -> dict:
        if self.workers == 0:
            return self.make(n)
        if self._it is None or self._next != n:
            self.close()
            import multiprocessing

            loader = torch.utils.data.DataLoader(
                _Items(self.make), batch_size=None, sampler=_CountFrom(n), num_workers=self.workers,
                prefetch_factor=self.prefetch, worker_init_fn=_one_thread,
                multiprocessing_context=multiprocessing.get_context("fork"))
            self._it, self._next = iter(loader), n
        item = next(self._it)
        self._next += 1
        return item

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
