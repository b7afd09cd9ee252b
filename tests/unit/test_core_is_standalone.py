"""asuka_core is pure PyTorch: importing and using it pulls in neither ComfyUI nor the
test-only oracles (diffusers, OpenCV)."""

import subprocess
import sys

import pytest

REPO = __file__.rsplit("/tests/", 1)[0]

SCRIPT = """
import sys, torch
import asuka_core
from asuka_core import load_mae, load_aligner, load_decoder, checkpoint, convert, imaging, resize, tiling
from asuka_core import poisson, super_resolution
from asuka_core import hd_painter, scoped_weights
banned = sorted(m for m in sys.modules
                if m.split('.')[0] in {'comfy', 'comfy_api', 'folder_paths', 'nodes', 'diffusers', 'cv2', 'timm'})
print(','.join(banned))
"""


def test_asuka_core_imports_no_comfyui_and_no_test_oracles():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"asuka_core imported: {proc.stdout.strip()}"


@pytest.mark.parametrize("name", ["load_mae", "load_aligner", "load_decoder"])
def test_public_api_is_exported(name):
    import asuka_core

    assert callable(getattr(asuka_core, name))


def test_hd_painter_maths_knows_no_comfyui_option_keys():
    """The ComfyUI plumbing of HD-Painter lives in nodes/hd_painter_glue.py; the maths module
    must not read ComfyUI's transformer_options or cond batching, not even by string key."""
    import os

    with open(os.path.join(REPO, "asuka_core", "hd_painter.py"), encoding="utf-8") as f:
        source = f.read()
    for key in ("transformer_options", "cond_or_uncond", "block_index", "original_shape", "activations_shape",
                "model_conds", "c_crossattn", "n_heads", "optimized_attention", "set_model_", "add_wrapper"):
        assert key not in source, key
