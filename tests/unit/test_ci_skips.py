"""In CI, a skipped test oracle fails the run unless its reason is listed in tests/skips.py."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.skips import ALLOWED_SKIP_REASONS, skip_reason_allowed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEMO = '''
import pytest

def test_needs_a_missing_oracle():
    pytest.importorskip("no_such_oracle_module_for_asuka_tests")

def test_skip_allowed_by_the_list():
    pytest.skip("this ComfyUI refuses a NaN multiplier, so no core node can make a NaN latent")

def test_passes():
    pass
'''


def _run(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_demo.py").write_text(DEMO)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # the suite's hooks as a plugin, on a test file outside the suite (no other config)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-c", os.devnull,
                           "--rootdir", str(tmp_path), str(tmp_path / "test_demo.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_unlisted_skip_fails_in_ci(tmp_path):
    res = _run(tmp_path, "true")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED" in res.stdout and "test_needs_a_missing_oracle" in res.stdout
    assert "tests/skips.py does not allow" in res.stdout
    assert "1 failed, 1 passed, 1 skipped" in res.stdout


def test_skips_stay_warnings_outside_ci(tmp_path):
    res = _run(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 2 skipped" in res.stdout


def test_oracle_skips_are_not_listed():
    """The reasons the suite's own oracle skips give must never be allowed."""
    for reason in ("could not import 'diffusers': No module named 'diffusers'",
                   "could not import 'cv2': No module named 'cv2'",
                   "host tests need a ComfyUI tree: run them with `scripts/host.sh test`",
                   "no Chromium on this machine (.ci/run installs Debian's chromium)",
                   "no node on this machine"):
        assert not skip_reason_allowed(reason), reason
    assert all(isinstance(why, str) and why for why in ALLOWED_SKIP_REASONS.values())
