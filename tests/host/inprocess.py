"""ComfyUI's own modules imported into the test process (no server).

Some behaviour can only be checked against ComfyUI's code itself, e.g. how
``ModelPatcher.load`` moves some layers and not others under ``--lowvram``, or what
``comfy.ops.manual_cast`` does with fp16/bf16 weights. These tests import ComfyUI from
``$ASUKA_COMFY_DIR`` (set by ``scripts/host.sh test``) with ``--cpu``, and the pack as a
package, as ComfyUI itself would.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest

from tests.host.comfy_client import REPO

PACK_MODULE = "comfyui_asuka_inprocess"


def comfy_modules() -> SimpleNamespace:
    """Import ComfyUI (CPU) and the pack; skip without a ComfyUI tree."""
    d = os.environ.get("ASUKA_COMFY_DIR")
    if not d:
        pytest.skip("host tests need a ComfyUI tree: run them with `scripts/host.sh test`")
    if d not in sys.path:
        sys.path.append(d)  # after the repository: its `nodes`/`tests` must not shadow ours
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops

    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_MODULE, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = pack
        spec.loader.exec_module(pack)
    common = importlib.import_module(f"{PACK_MODULE}.nodes.common")
    return SimpleNamespace(mm=mm, ops=comfy.ops, model_patcher=comfy.model_patcher, common=common,
                           pack=lambda name: importlib.import_module(f"{PACK_MODULE}.{name}"))
