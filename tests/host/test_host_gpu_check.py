"""benchmarks/gpu_check.py runs (CPU smoke mode: tiny models, the same code paths) and
reports every dtype path as finite and close to float32. It cannot check GPU figures:
there is no GPU here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.host.comfy_client import REPO


def test_gpu_check_smoke_run(comfy_dir, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--comfy", comfy_dir,
                           "--device", "cpu", "--smoke", "--models", "aligner_sd15,asuka_decoder", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["info"]["smoke"] and report["info"]["device"] == "cpu"
    rows = {(r["model"], r["dtype"]): r for r in report["models"]}
    assert set(rows) == {(m, d) for m in ("aligner_sd15", "asuka_decoder") for d in ("float32", "bfloat16", "float16")}
    for (model, dtype), row in rows.items():
        assert row["finite"] and "error" not in row, row
        assert row["rel_rms_error"] < (0.05 if dtype == "bfloat16" else 0.01), row
    memory = [r for r in report["decoder_memory"] if r.get("estimate_bytes")]
    assert memory and all(r["peak_bytes"] <= r["estimate_bytes"] for r in memory)
    assert "| asuka_decoder | float16 |" in proc.stdout and "0 problem(s)" in proc.stdout
