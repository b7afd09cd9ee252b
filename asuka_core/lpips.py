"""LPIPS (AlexNet, v0.1) from weight files the user supplies; nothing is downloaded.

Used by the evaluation (``scripts/evaluate_learned.py``) as a metric and by the decoder
trainer (``asuka_core.training.decoder_loop``) as a perceptual loss, so both compute the
same distance.

* ``alexnet_state``: torchvision's ImageNet AlexNet state dict (``alexnet-owt-7be5be79.pth``);
* ``lin_state``: the LPIPS v0.1 linear layers (``weights/v0.1/alex.pth`` in the ``lpips``
  Python package).

Inputs in -1..1, the LPIPS scaling layer, unit-normalised features of the five ReLU
stages, squared differences weighted by the linear layers, spatial means, summed.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .errors import InputError

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_CHANNELS = (64, 192, 384, 256, 256)


def load_state(path: str, what: str) -> dict:
    """A weights-only state dict from ``path`` (``state_dict`` unwrapped); ``what`` names
    the setting in the error."""
    if not path or not os.path.isfile(path):
        raise InputError(f"{what}: no file at {path}.")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise InputError(f"{what}: {path} is not a readable PyTorch state dict ({e}).") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return sd


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet ``features`` (same module indices, so its state dict loads)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
    )


class LPIPS(nn.Module):
    """``forward(a, b)`` (no gradients, the metric) and ``distance(a, b)`` (differentiable
    in its inputs, the training loss); the network itself is frozen."""

    TAPS = (1, 4, 7, 9, 11)   # outputs of the five ReLUs

    def __init__(self, alexnet_state: dict, lin_state: dict, *, alexnet_what: str = "--alexnet-weights",
                 lin_what: str = "--lpips-weights"):
        super().__init__()
        self.features = alexnet_features()
        feats = {k[len("features."):]: v for k, v in alexnet_state.items() if k.startswith("features.")}
        missing = self.features.load_state_dict(feats, strict=False)
        if missing.missing_keys:
            raise InputError(f"{alexnet_what}: not a torchvision AlexNet state dict (missing "
                             f"{missing.missing_keys[:3]}).")
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        for i, lin in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"
            if key not in lin_state or lin_state[key].shape != lin.weight.shape:
                raise InputError(f"{lin_what}: not the LPIPS v0.1 AlexNet linear layers ({key} missing or "
                                 "mis-shaped); use weights/v0.1/alex.pth from the lpips package.")
            lin.weight.data.copy_(lin_state[key])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, alexnet: str, lin: str, *, alexnet_what: str = "--alexnet-weights",
                   lin_what: str = "--lpips-weights") -> "LPIPS":
        return cls(load_state(alexnet, alexnet_what), load_state(lin, lin_what),
                   alexnet_what=alexnet_what, lin_what=lin_what)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (torch.sqrt((x * x).sum(1, keepdim=True)) + 1e-10))
            if i == self.TAPS[-1]:
                break
        return out

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a``, ``b``: ``[N, 3, H, W]`` in -1..1 -> ``[N]``, with gradients."""
        total = 0
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            total = total + lin((fa - fb) ** 2).mean((2, 3))
        return total[:, 0]

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a``, ``b``: ``[N, 3, H, W]`` in -1..1 -> ``[N]``."""
        return self.distance(a, b)
