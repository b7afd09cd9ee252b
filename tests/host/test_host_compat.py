"""The pack on the ComfyUI version under test (0.3.75, or 0.33.0 with ``ASUKA_COMFY=0.33.0``):
every ComfyUI internal the pack names in ``compat.py`` is there, a changed one is reported
with the pack's name and ComfyUI's version, and the host starts without tracebacks, failed
imports or advice to reinstall requirements."""

from __future__ import annotations

import os
import re

import pytest

from tests.host.inprocess import comfy_modules

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def compat():
    return comfy_modules().pack("compat")


def _tree_version() -> str:
    with open(os.path.join(os.environ["ASUKA_COMFY_DIR"], "comfyui_version.py"), encoding="utf-8") as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def _changed(compat) -> list[str]:
    """``changed_internals`` in this test process, where ComfyUI's ``server`` module cannot be
    imported (it imports ComfyUI's ``nodes``, shadowed here by the pack's ``nodes/``); the
    server's own start-up check covers it (``test_host_starts_quietly``)."""
    return [p for p in compat.changed_internals() if not p.startswith("server.")]


def test_every_internal_the_pack_uses_is_there(compat):
    assert compat.comfy_version() == _tree_version()
    assert compat.comfy_version() in compat.TESTED_COMFYUI
    assert _changed(compat) == []


def test_a_missing_internal_is_named_with_the_comfyui_version(compat, monkeypatch):
    import comfy.samplers

    monkeypatch.delattr(comfy.samplers, "KSAMPLER")
    report = compat.compatibility_report()
    assert report.startswith("comfyui-asuka was tested on ComfyUI 0.3.75 and 0.33.0; this is ComfyUI "
                             + _tree_version())
    assert "comfy.samplers.KSAMPLER is missing" in report


def test_a_changed_signature_is_named(compat, monkeypatch):
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "load_models_gpu", lambda models, memory_required=0: None)
    assert _changed(compat) == ["comfy.model_management.load_models_gpu no longer takes force_full_load"]


def test_a_failed_node_import_names_the_pack_and_version(compat):
    message = compat.load_error(ImportError("cannot import name 'io' from 'comfy_api.latest'"))
    assert message == (f"comfyui-asuka could not load its nodes on ComfyUI {_tree_version()} (tested on 0.3.75 "
                       "and 0.33.0): ImportError: cannot import name 'io' from 'comfy_api.latest'")


def test_host_starts_quietly(host):
    """No traceback, failed import, reinstall advice or pack warning in the server's start-up
    log (everything up to "Starting server"), and the pack itself loaded."""
    with open(host.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    startup = log.split("Starting server")[0]
    for noise in ("Traceback", "IMPORT FAILED", "Cannot import", "pip install -r requirements.txt",
                  "torchaudio missing", "comfyui-asuka was tested on", "comfyui-asuka could not load"):
        assert noise not in startup, f"{noise!r} in the start-up log:\n{startup}"
    assert re.search(r"\d+\.\d seconds: .*comfyui-asuka\n", startup), startup
