"""ComfyUI's tensor conventions, checked once, in one place.

* IMAGE: float ``[B, H, W, C]`` in 0..1 (C = 3; 1 and 4 are converted here).
* MASK:  float ``[B, H, W]`` in 0..1, 1 = hole (``[H, W]`` and ``[B, 1, H, W]`` accepted).
* LATENT samples: raw VAE latents ``[B, C, H/8, W/8]``.

Every model entry point (``MAE.encode``, ``MaskedDecoder.decode``) goes through
``prepare_image_and_mask`` so that shape, batch, size and value problems produce the
same clear messages everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError


def to_image_batch(image: torch.Tensor) -> torch.Tensor:
    """Return ``[B, H, W, 3]`` float. Grey images are repeated to RGB, alpha is dropped."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"Expected an IMAGE tensor, got {type(image).__name__}.")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise InputError(
            f"IMAGE must be [batch, height, width, channels]; got shape {list(image.shape)}."
        )
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise InputError(
            f"IMAGE has {channels} channels; expected RGB (3). Grey (1) and RGBA (4) are "
            "converted automatically, other layouts are not."
        )
    if image.shape[1] == 0 or image.shape[2] == 0 or image.shape[0] == 0:
        raise InputError(f"IMAGE is empty: shape {list(image.shape)}.")
    image = image.float()
    if not torch.isfinite(image).all():
        raise InputError("IMAGE contains NaN or infinite values; check the node that produced it.")
    return image


def to_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """Return ``[B, H, W]`` float."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"Expected a MASK tensor, got {type(mask).__name__}.")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise InputError(f"MASK must be [batch, height, width]; got shape {list(mask.shape)}.")
    mask = mask.float()
    if not torch.isfinite(mask).all():
        raise InputError("MASK contains NaN or infinite values; check the node that produced it.")
    return mask.clamp(0.0, 1.0)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``[B, H, W]`` to the image size the way core ComfyUI nodes do (bilinear)."""
    if mask.shape[-2:] == (height, width):
        return mask
    return F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear").squeeze(1)


def match_batch(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask for many images, or one image for many masks, is broadcast; other
    mismatches are an error."""
    bi, bm = image.shape[0], mask.shape[0]
    if bi == bm:
        return image, mask
    if bm == 1:
        return image, mask.expand(bi, -1, -1)
    if bi == 1:
        return image.expand(bm, -1, -1, -1), mask
    raise InputError(
        f"{bi} images but {bm} masks: give one mask per image, or a single mask for all of them."
    )


def prepare_image_and_mask(image: torch.Tensor, mask: torch.Tensor, *,
                           require_hole: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and align an IMAGE and a MASK: ``([B,H,W,3], [B,H,W])`` on the image's
    device, the mask resized to the image if needed."""
    image = to_image_batch(image)
    mask = to_mask_batch(mask).to(image.device)
    mask = resize_mask(mask, image.shape[1], image.shape[2])
    image, mask = match_batch(image, mask)
    if require_hole:
        empty = [i for i in range(mask.shape[0]) if not (mask[i] > 0).any()]
        if empty:
            which = "the mask is" if mask.shape[0] == 1 else f"mask(s) {empty} are"
            raise InputError(
                f"Nothing to inpaint: {which} empty (all 0). Paint the area to fill in the mask "
                "editor (right-click the LoadImage node, 'Open in MaskEditor'), or connect a mask."
            )
    return image, mask


def image_to_model(image: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B,H,W,3]`` 0..1 -> ``[B,3,H,W]`` in -1..1 (the VAE / decoder range)."""
    return image.movedim(-1, 1) * 2.0 - 1.0


def model_to_image(x: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` in -1..1 -> IMAGE ``[B,H,W,3]`` 0..1, clamped as core VAE decoding does."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)


def composite(image: torch.Tensor, decoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste the decoded fill into the original: IMAGE-layout tensors and a ``[B,H,W]``
    mask. Where the mask is 0 the result is exactly the original pixel; soft mask values
    blend linearly."""
    return torch.lerp(image, decoded, mask.unsqueeze(-1).to(decoded.dtype))
