"""The pack's frontend extension (web/js/asuka.js) in ComfyUI's real frontend, headless
Chromium: after a run from the browser, MAE Prior shows what the prior sees beside the MAE's
reconstruction, and Masked Decode shows its result with a toggle for the hole's outline.
The screenshots of the preview elements are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.host.test_host_example_workflows import FRONTEND, _frontend_ready

pytestmark = pytest.mark.host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import workflows  # noqa: E402
from workflows import Node  # noqa: E402

from asuka_core import previews  # noqa: E402


def _pixels_near(picture: np.ndarray, colour, tol: int = 40) -> int:
    target = np.array(colour) * 255
    return int((np.abs(picture[..., :3].astype(int) - target).max(axis=-1) <= tol).sum())


def test_previews_in_the_real_frontend(host, comfy, tmp_path):
    reason = _frontend_ready()
    if reason:
        pytest.skip(reason)
    info = comfy.object_info()
    graph = {
        "load": Node("LoadImage", {"image": workflows.ASUKA_IMAGE}, pos=(0, 0)),
        "mae_loader": Node("ASUKA_MAELoader", {"mae_name": host.models.mae}, pos=(0, 420)),
        "prior": Node("ASUKA_MAEPrior", links={"mae": ("mae_loader", 0), "image": ("load", 0),
                                               "mask": ("load", 1)}, pos=(360, 0)),
        "recon": Node("PreviewImage", links={"images": ("prior", 1)}, pos=(360, 420)),
        "encode": Node("VAEEncode", links={"pixels": ("load", 0), "vae": ("ckpt", 2)}, pos=(760, 420)),
        "ckpt": Node("CheckpointLoaderSimple", {"ckpt_name": host.checkpoint}, pos=(360, 640)),
        "decoder_loader": Node("ASUKA_DecoderLoader", {"decoder_name": host.models.avq_decoder}, pos=(760, 640)),
        "decode": Node("ASUKA_MaskedDecode", {"composite": True, "tile_size": 0, "tile_overlap": 64},
                       links={"decoder": ("decoder_loader", 0), "samples": ("encode", 0), "image": ("load", 0),
                              "mask": ("load", 1)}, pos=(760, 0)),
        "out": Node("PreviewImage", links={"images": ("decode", 0)}, pos=(1160, 0)),
    }
    path = tmp_path / "extension.json"
    path.write_text(json.dumps(workflows.to_ui_workflow(graph, info)))
    out_dir = os.environ.get("ASUKA_FRONTEND_SHOTS") or str(tmp_path)
    os.makedirs(out_dir, exist_ok=True)
    proc = subprocess.run(["node", "preview_extension.mjs", host.client.base_url, str(path), out_dir], cwd=FRONTEND,
                          capture_output=True, text=True, timeout=420)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr + comfy.log_tail()
    report = json.loads(lines[-1])
    assert report["extensionLoaded"], report
    assert not report["errors"], report["errors"]
    assert report["captions"][:3] == ["What the prior sees (pink: hidden)", "MAE reconstruction", "Result"], report
    sizes = {(i["cls"], i["width"], i["height"]) for i in report["images"]}
    assert all(w == 512 and h == 512 for _, w, h in sizes), sizes          # the 512 px bundled picture
    # the extension's widget is neither saved with the workflow nor sent with the prompt
    assert report["widgetsUnchanged"], report
    assert "asuka_preview" not in report["promptInputs"]["ASUKA_MaskedDecode"], report["promptInputs"]
    assert report["outlineShown"], report
    # the template list in the numbered order (FLUX first, training last), whatever the folder's order
    titles = [workflows.TITLES[k] for k in ("asuka_flux_fill", "hd_painter_sd15", "hd_painter_2k",
                                            "asuka_sd15_inpaint", "asuka_sd15_train_aligner",
                                            "asuka_sd15_train_decoder")]
    assert [t for t in report["templates"] if t in titles] == titles, report["templates"]

    prior = np.asarray(Image.open(os.path.join(out_dir, "prior.png")).convert("RGB"))
    tinted = np.array(previews.HIDDEN_TINT) * previews.HIDDEN_STRENGTH
    # some pixels of the hidden patches: the pink tint over the picture
    assert _pixels_near(prior, tinted + 0.15, tol=70) > 200, "no hidden-patch tint in the prior's preview"
    off = np.asarray(Image.open(os.path.join(out_dir, "decode_off.png")).convert("RGB"))
    on = np.asarray(Image.open(os.path.join(out_dir, "decode_on.png")).convert("RGB"))
    assert off.shape == on.shape and off.shape[0] > 150 and off.shape[1] > 250
    assert _pixels_near(on, previews.OUTLINE_COLOUR) > _pixels_near(off, previews.OUTLINE_COLOUR) + 200, \
        "the outline toggle did not show the outline"
