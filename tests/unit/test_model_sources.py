"""The one table of model sources: README agrees with it, messages and workflow metadata come from it."""

from __future__ import annotations

import os
import re

from asuka_core import model_sources as ms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_quotes_the_table():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = re.search(r"<!-- model-sources:[^\n]*-->\n(.*?)\n<!-- /model-sources -->", readme, re.S)
    assert block, "README lost its model-sources block"
    assert block.group(1) == ms.markdown_table(), "README's model table differs from asuka_core/model_sources.py"


def test_missing_message_lists_every_file_with_folder_and_source():
    missing = [("ASUKA_MAELoader", "asuka", "mae_300.pth"),
               ("ASUKA_AlignerLoader", "asuka", "my_aligner.safetensors"),
               ("UNETLoader", "diffusion_models", "flux1-fill-dev.safetensors"),
               ("UNETLoader", "diffusion_models", "flux1-fill-dev.safetensors"),  # twice in the graph: once
               ("CheckpointLoaderSimple", "checkpoints", "someone_elses.safetensors")]
    text = ms.missing_files_message(missing, {"asuka": ["/m/asuka", "/other"], "diffusion_models": ["/m/dm"]})
    lines = text.splitlines()
    assert lines[0] == "4 model files are missing:"
    assert "mae_300.pth -> models/asuka [/m/asuka]" in lines[1] and ms.ASUKA_FLUX_REPO in lines[1]
    # an aligner that is not a released FLUX file is an SD1.5 aligner: nobody publishes one
    assert "my_aligner.safetensors -> models/asuka [/m/asuka]" in lines[2] and "cannot be downloaded" in lines[2]
    assert "train" in lines[2]
    assert "models/diffusion_models [/m/dm]" in lines[3] and "resolve/main/flux1-fill-dev.safetensors" in lines[3]
    assert "-> models/checkpoints (" in lines[4] and "not a file this pack knows" in lines[4]
    assert len(lines) == 6


def test_lookup_needs_the_right_folder_and_ignores_subfolders():
    assert ms.source_for("sub/dir/mae_300.pth", "asuka").name == "mae_300.pth"
    assert ms.source_for("mae_300.pth", "checkpoints") is None
    assert ms.source_for("asuka_alignment_t5.pt", "asuka", "ASUKA_AlignerLoader").downloadable
    assert not ms.source_for("x.safetensors", "asuka", "ASUKA_AlignerLoader").downloadable


def test_workflow_metadata_is_the_frontends_format():
    meta = ms.workflow_metadata("ae.safetensors", "vae")
    assert meta == {"name": "ae.safetensors", "url": ms.FLUX_FILL_REPO + "/resolve/main/ae.safetensors",
                    "directory": "vae"}
    assert ms.workflow_metadata("asuka_sd15_aligner.safetensors", "asuka") is None   # nothing to download
    assert ms.workflow_metadata("unknown.safetensors", "vae") is None
    # the frontend keeps one entry per url: files that share a page must still differ
    urls = {ms.workflow_metadata(n, "asuka")["url"] for n in ("mae_300.pth", "asuka_decoder.ckpt",
                                                              "asuka_alignment_clip.pt", "asuka_alignment_t5.pt")}
    assert len(urls) == 4
    for entry in ms.MODEL_SOURCES:
        for url in (entry.page, entry.url):
            assert url is None or url.startswith("https://huggingface.co/"), url  # the dialog's allowed source
