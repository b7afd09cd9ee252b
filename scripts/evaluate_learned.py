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
* CLIP score (``--protocol misato`` only): ``--clip-weights`` = a local folder with a
  Hugging Face ``transformers`` CLIP model (``config.json`` + ``model.safetensors``; the
  official script uses OpenAI's ViT-L/14, that is openai/clip-vit-large-patch14), OpenAI's
  CLIP preprocessing (``clip_preprocess``), the projected image embeddings; the score is
  ``asuka_core.metrics.clip_score`` of ``clip_inputs``.
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


def _resize_crop(img: np.ndarray, resize: int, crop: int, resample: int) -> torch.Tensor:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` + ``ToTensor()`` on the PIL form
    of one RGB image (uint8, or 0..1 floats rounded to uint8): resized with PIL's own
    ``resample`` filter so that its shorter side is ``resize`` and its longer
    ``int(resize * long / short)``; the centre ``crop`` x ``crop`` with offsets
    ``int(round((side - crop) / 2))``; to 0..1 floats. ``[3, crop, crop]`` float32."""
    pil = Image.fromarray(_uint8(img)).convert("RGB")
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)      # (width, height)
    if size != (w, h):
        pil = pil.resize(size, resample)
    w, h = pil.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    pil = pil.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


def _normalise(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def inception_preprocess(img: np.ndarray) -> torch.Tensor:
    """torchvision's ``Inception_V3_Weights.IMAGENET1K_V1.transforms()`` on one RGB image
    (uint8, or 0..1 floats rounded to uint8), as the MISATO IDS script applies it to PIL
    images: the PIL image resized (bilinear, PIL's own filter on uint8) so that its shorter
    side is 342 and its longer ``int(342 * long / short)``; the centre 299 x 299 crop with
    offsets ``int(round((side - 299) / 2))`` (22 on a 342 side); to 0..1 floats; ImageNet
    mean / std. Returns ``[3, 299, 299]`` float32."""
    x = _resize_crop(img, INCEPTION_RESIZE, INCEPTION_CROP, Image.BILINEAR)
    return _normalise(x, IMAGENET_MEAN, IMAGENET_STD)


# the normalisation of OpenAI's CLIP preprocessing (clip.load's transform)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(img: np.ndarray, size: int = 224) -> torch.Tensor:
    """The preprocessing OpenAI's ``clip.load`` returns, which the MISATO CLIP script applies
    to its PIL images: resized with PIL's bicubic filter so that the shorter side is the
    model's input size (224 for ViT-L/14), centre crop to ``size`` x ``size``, 0..1 floats,
    CLIP mean / std. Returns ``[3, size, size]`` float32."""
    return _normalise(_resize_crop(img, size, size, Image.BICUBIC), CLIP_MEAN, CLIP_STD)


def _clip_vision_config(folder: str):
    """The vision tower's config in ``folder``: that of a whole ``CLIPModel`` (its
    ``vision_config``, with the model's ``projection_dim``, which the vision part alone does
    not state) or of a ``CLIPVisionModelWithProjection``."""
    import json

    from transformers import CLIPVisionConfig

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("model_type") == "clip":
        vision = dict(cfg.get("vision_config") or {})
        if "projection_dim" in cfg:
            vision["projection_dim"] = cfg["projection_dim"]
        vision.pop("model_type", None)
        return CLIPVisionConfig(**vision)
    return CLIPVisionConfig.from_pretrained(folder, local_files_only=True)


class ClipImageFeatures:
    """CLIP image embeddings (``encode_image``: the final layer norm of the class token, times
    the visual projection) of a Hugging Face ``transformers`` CLIP model read from a local
    folder (``config.json`` + ``model.safetensors``: a ``CLIPModel`` such as
    openai/clip-vit-large-patch14, or only its ``CLIPVisionModelWithProjection``). Nothing is
    downloaded and no pickle is read. float32 throughout (the official script runs the
    model in float16 on its GPU)."""

    def __init__(self, path: str, batch: int = 16):
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise InputError(f"--clip-weights: {path} is not a folder with a Hugging Face CLIP model "
                             "(config.json + model.safetensors, e.g. a local copy of "
                             "openai/clip-vit-large-patch14).")
        try:
            from transformers import CLIPVisionModelWithProjection
        except Exception as e:  # noqa: BLE001
            raise InputError(f"The CLIP score needs the transformers package, which does not import here ({e}).") from None
        bad = (f"--clip-weights: {folder} does not load as a CLIP vision model with projection "
               "(config.json + model.safetensors)")
        try:
            config = _clip_vision_config(folder)
            net, info = CLIPVisionModelWithProjection.from_pretrained(
                folder, config=config, local_files_only=True, use_safetensors=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise InputError(f"{bad}: {str(e)[:300]}") from None
        # transformers initialises whatever the file lacks or shapes differently: refuse that
        missing = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
        if missing:
            raise InputError(f"{bad}: the file lacks or misshapes {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + ".")
        self.net = net.float().eval()          # whatever dtype the file holds (one call on every version)
        self.size = int(net.config.image_size)
        self.batch = batch

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        feats = []
        for i in range(0, len(images), self.batch):
            x = torch.stack([clip_preprocess(img, self.size) for img in images[i:i + self.batch]])
            feats.append(self.net(pixel_values=x).image_embeds.float().numpy())
        return np.concatenate(feats).astype(np.float32)


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
    def __init__(self, lpips: str | None = None, alexnet: str | None = None, inception: str | None = None,
                 clip: str | None = None):
        self.notes: list[str] = []
        self._lpips = None
        self._inception = None
        self._clip = ClipImageFeatures(clip) if clip else None
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

    @property
    def has_clip(self) -> bool:
        return self._clip is not None

    def clip_score(self, truths: list[np.ndarray], results: list[np.ndarray], masks: list[np.ndarray]) -> float:
        """The MISATO CLIP score of results against their ground truths (in pair order): the
        mean cosine similarity of the CLIP embeddings of the two, each kept only inside the
        hole (``asuka_core.metrics.clip_inputs`` and ``clip_score``)."""
        pairs = [metrics.clip_inputs(_uint8(r), _uint8(g), m) for r, g, m in zip(results, truths, masks)]
        return metrics.clip_score(self._clip([p[0] for p in pairs]), self._clip([p[1] for p in pairs]))

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
