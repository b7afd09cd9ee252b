"""The learned metrics of ``scripts/evaluate.py``: LPIPS (AlexNet, v0.1) and FID / U-IDS /
P-IDS (Inception v3 pool features), from weight files the user supplies. Nothing is
downloaded.

* LPIPS: ``--alexnet-weights`` = torchvision's ImageNet AlexNet state dict
  (``alexnet-owt-7be5be79.pth``) and ``--lpips-weights`` = the LPIPS v0.1 linear layers
  (``weights/v0.1/alex.pth`` inside the ``lpips`` Python package). Inputs in -1..1, the
  LPIPS scaling layer, unit-normalised features of the five ReLU stages, squared
  differences weighted by the linear layers, spatial means, summed.
* FID, U-IDS, P-IDS: ``--inception-weights`` = torchvision's ImageNet Inception v3 state
  dict (``inception_v3_google-0cc3c7bd.pth``), as the ASUKA evaluation uses it: resize to
  342, centre crop 299, ImageNet normalisation, 2048-d pool features (``fc`` removed). The
  distances themselves are ``asuka_core.metrics.frechet_distance`` and
  ``discriminative_scores``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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


class InceptionFeatures:
    def __init__(self, state: dict):
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
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        feats = []
        for img in images:
            x = _to_nchw(img)
            h, w = x.shape[-2:]
            s = 342 / min(h, w)
            x = F.interpolate(x, size=(max(299, round(h * s)), max(299, round(w * s))), mode="bilinear",
                              align_corners=False, antialias=True)
            top, left = (x.shape[-2] - 299) // 2, (x.shape[-1] - 299) // 2
            x = x[..., top:top + 299, left:left + 299]
            feats.append(self.net((x - self.mean) / self.std).numpy()[0])
        return np.stack(feats).astype(np.float64)


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

    def dataset_scores(self, truths: list[np.ndarray], results: list[np.ndarray]) -> dict[str, float]:
        real, fake = self._inception(truths), self._inception(results)
        u, p = metrics.discriminative_scores(real, fake)
        return {"FID": metrics.frechet_distance(real, fake), "U-IDS": u, "P-IDS": p}
