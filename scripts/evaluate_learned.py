"""The learned metrics of ``scripts/evaluate.py``: LPIPS (AlexNet, v0.1) and FID / U-IDS /
P-IDS (Inception v3 pool features), from weight files the user supplies. Nothing is
downloaded.

* LPIPS: ``--alexnet-weights`` = torchvision's ImageNet AlexNet state dict
  (``alexnet-owt-7be5be79.pth``) and ``--lpips-weights`` = the LPIPS v0.1 linear layers
  (``weights/v0.1/alex.pth`` inside the ``lpips`` Python package). Inputs in -1..1, the
  LPIPS scaling layer, unit-normalised features of the five ReLU stages, squared
  differences weighted by the linear layers, spatial means, summed.
* FID, U-IDS, P-IDS: ``--inception-weights`` = torchvision's ImageNet Inception v3 state
  dict (``inception_v3_google-0cc3c7bd.pth``), as the ASUKA evaluation uses it: the
  preprocessing of torchvision's ``Inception_V3_Weights`` (``inception_preprocess``), 2048-d
  pool features (``fc`` removed). The distances themselves are
  ``asuka_core.metrics.frechet_distance`` and ``discriminative_scores``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from asuka_core import metrics
from asuka_core.errors import InputError
from asuka_core.lpips import LPIPS, alexnet_features, load_state  # noqa: F401  (re-exported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_state = load_state


def _to_nchw(img: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(img))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return t.permute(2, 0, 1)[None]


INCEPTION_RESIZE = 342
INCEPTION_CROP = 299


def _uint8(img: np.ndarray) -> np.ndarray:
    """An RGB image as uint8 (float images are 0..1 and rounded: a pasted uint8 image comes
    back exactly)."""
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a
    return np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def inception_preprocess(img: np.ndarray) -> torch.Tensor:
    """torchvision's ``Inception_V3_Weights.IMAGENET1K_V1.transforms()`` on one RGB image
    (uint8, or 0..1 floats rounded to uint8), as the MISATO IDS script applies it to PIL
    images: the PIL image resized (bilinear, PIL's own filter on uint8) so that its shorter
    side is 342 and its longer ``int(342 * long / short)``; the centre 299 x 299 crop with
    offsets ``int(round((side - 299) / 2))`` (22 on a 342 side); to 0..1 floats; ImageNet
    mean / std. Returns ``[3, 299, 299]`` float32."""
    pil = Image.fromarray(_uint8(img)).convert("RGB")
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = INCEPTION_RESIZE, int(INCEPTION_RESIZE * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)      # (width, height)
    if size != (w, h):
        pil = pil.resize(size, Image.BILINEAR)
    w, h = pil.size
    top, left = int(round((h - INCEPTION_CROP) / 2.0)), int(round((w - INCEPTION_CROP) / 2.0))
    pil = pil.crop((left, top, left + INCEPTION_CROP, top + INCEPTION_CROP))
    x = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


class InceptionFeatures:
    """2048-d pool features of torchvision's Inception v3 (its ImageNet weights, from a file),
    after ``inception_preprocess``. Returns float32 ``[N, 2048]``, as the official script
    gets them."""

    def __init__(self, state: dict, batch: int = 16):
        try:
            from torchvision.models import inception_v3
        except Exception as e:  # noqa: BLE001
            raise InputError(f"FID / IDS need torchvision's Inception v3, which does not import here ({e}).") from None
        # as torchvision builds it for its ImageNet weights
        net = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise InputError("--inception-weights: not torchvision's Inception v3 ImageNet state dict "
                             f"(inception_v3_google-0cc3c7bd.pth): {str(e)[:300]}") from None
        net.fc = nn.Identity()
        self.net = net.eval()
        self.batch = batch

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        feats = []
        for i in range(0, len(images), self.batch):
            x = torch.stack([inception_preprocess(img) for img in images[i:i + self.batch]])
            feats.append(self.net(x).numpy())
        return np.concatenate(feats).astype(np.float32)


class LearnedMetrics:
    def __init__(self, lpips: str | None = None, alexnet: str | None = None, inception: str | None = None):
        self.notes: list[str] = []
        self._lpips = None
        self._inception = None
        if bool(lpips) != bool(alexnet):
            raise InputError("LPIPS needs both --lpips-weights (LPIPS v0.1 alex.pth) and --alexnet-weights "
                             "(torchvision alexnet-owt-7be5be79.pth).")
        if lpips:
            self._lpips = LPIPS(_state(alexnet, "--alexnet-weights"), _state(lpips, "--lpips-weights"))
            self.notes.append(f"LPIPS (AlexNet, v0.1) from {os.path.basename(alexnet)} + {os.path.basename(lpips)}.")
        else:
            self.notes.append("LPIPS not computed: pass --lpips-weights and --alexnet-weights.")
        if inception:
            self._inception = InceptionFeatures(_state(inception, "--inception-weights"))
            self.notes.append(f"FID, U-IDS, P-IDS from Inception v3 ({os.path.basename(inception)}) pool "
                              "features of the pasted results against the originals; over a few hundred "
                              "images or fewer they are rough.")
        else:
            self.notes.append("FID and U-IDS/P-IDS not computed: pass --inception-weights.")

    @property
    def has_lpips(self) -> bool:
        return self._lpips is not None

    @property
    def has_inception(self) -> bool:
        return self._inception is not None

    def lpips(self, result: np.ndarray, truth: np.ndarray) -> float:
        a, b = _to_nchw(result) * 2 - 1, _to_nchw(truth) * 2 - 1
        return float(self._lpips(a, b)[0])

    def dataset_scores(self, truths: list[np.ndarray], results: list[np.ndarray], pca_dim: int | None = None,
                       seed: int = 0) -> dict[str, float]:
        """FID, U-IDS and P-IDS of pasted results against their ground truths (in pair order);
        ``pca_dim`` / ``seed``: see ``asuka_core.metrics.discriminative_scores``."""
        real, fake = self._inception(truths), self._inception(results)
        u, p = metrics.discriminative_scores(real, fake, pca_dim=pca_dim, seed=seed)
        return {"FID": metrics.frechet_distance(real, fake), "U-IDS": u, "P-IDS": p}
