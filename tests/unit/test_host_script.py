"""scripts/host.sh picks its ComfyUI version from ASUKA_COMFY: each tested version has its own
lock file (CPU torch 2.13.0 and that tree's requirements), an untested one is refused before
anything is downloaded or written."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST_SH = os.path.join(REPO, "scripts", "host.sh")
TESTED = ("0.3.75", "0.33.0")


def _pins(version: str) -> dict[str, str]:
    with open(os.path.join(REPO, "scripts", f"host-lock-{version}.txt"), encoding="utf-8") as f:
        return dict(line.strip().split("==", 1) for line in f if re.match(r"[A-Za-z0-9]", line))


@pytest.mark.parametrize("version", TESTED)
def test_each_version_has_a_lock_with_cpu_torch_2_13(version):
    pins = _pins(version)
    assert pins["torch"] == "2.13.0"
    assert {"torchvision", "torchaudio"} <= set(pins)   # ComfyUI imports both at start-up
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pins.values()), pins   # exact pins only


def test_the_locks_pin_each_version_s_own_frontend():
    assert _pins("0.3.75")["comfyui_frontend_package"] == "1.32.9"
    assert _pins("0.33.0")["comfyui_frontend_package"] == "1.48.7"


def test_an_untested_version_is_refused_before_any_set_up(tmp_path):
    host_dir = tmp_path / "host"
    proc = subprocess.run(["bash", HOST_SH, "setup"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ASUKA_COMFY": "0.34.0", "ASUKA_HOST_DIR": str(host_dir)})
    assert proc.returncode == 2
    assert "ASUKA_COMFY=0.34.0 is not a tested ComfyUI version: use 0.3.75 (default) or 0.33.0" in proc.stderr
    assert not host_dir.exists()


def test_a_missing_tarball_is_named_with_where_to_get_one(tmp_path):
    proc = subprocess.run(["bash", HOST_SH, "setup"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ASUKA_COMFY": "0.33.0", "ASUKA_HOST_DIR": str(tmp_path / "host"),
                               "ASUKA_COMFY_TARBALL": str(tmp_path / "none.tar.gz")})
    assert proc.returncode == 1
    assert f"no ComfyUI 0.33.0 tarball at {tmp_path / 'none.tar.gz'}" in proc.stderr
    assert "archive/refs/tags/v0.33.0.tar.gz" in proc.stderr
