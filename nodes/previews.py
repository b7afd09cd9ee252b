"""Pictures the pack's frontend extension (web/js/asuka.js) shows on nodes after a run.

Each node that has one returns ``ui={"asuka_preview": [...]}``: temporary PNGs in ComfyUI's
temp folder, each entry a ``{filename, subfolder, type}`` record plus its ``role``. The key is
the pack's own, so the stock frontend shows nothing extra without the extension. The pictures
are made by ``asuka_core.previews``; only the first picture of a batch is shown.
"""

from __future__ import annotations

import torch
from comfy_api.latest import ui

from ..asuka_core import previews
from ..asuka_core.imaging import prepare_image_and_mask

UI_KEY = "asuka_preview"
MAX_SIDE = 512


def _save(pictures: list[tuple[str, torch.Tensor]]) -> dict:
    """Save ``(role, [H,W,C] 0..1)`` pictures to the temp folder; the ui entry of the node."""
    out = []
    for role, picture in pictures:
        saved = ui.PreviewImage(picture.unsqueeze(0).float().cpu(), cls=None).values[0]
        out.append({**saved, "role": role})
    return {UI_KEY: out}


def prior_preview(image: torch.Tensor, mask: torch.Tensor, prior) -> dict:
    """MAE Prior: the picture with the patches the MAE does not see tinted, and its reconstruction."""
    image, _ = prepare_image_and_mask(image, mask, require_hole=False)
    view = previews.fit(image[:1].float().cpu(), MAX_SIDE)
    view = previews.hidden_patch_overlay(view, prior.patch_mask[:1].cpu())
    recon = previews.fit(prior.reconstruction[:1].float().cpu(), MAX_SIDE)
    return _save([("prior_view", view[0]), ("reconstruction", recon[0])])


def decode_preview(pixels: torch.Tensor, mask: torch.Tensor) -> dict:
    """Masked Decode: the result, and the outline of the hole as a transparent layer over it."""
    pixels, mask = prepare_image_and_mask(pixels[:1].float().cpu(), mask, require_hole=False)
    pixels, mask = pixels[:1], mask[:1].cpu()   # one image for many masks is broadcast: keep the first
    result = previews.fit(pixels, MAX_SIDE * 2)
    outline = previews.outline_layer(previews.fit(mask.unsqueeze(-1), MAX_SIDE * 2)[..., 0])
    return _save([("result", result[0]), ("outline", outline[0])])
