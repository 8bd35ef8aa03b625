"""bench/gpu.sh --dry-run runs every step of the GPU script at tiny sizes on the CPU (issue #16.5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_script_dry_run(tmp_path):
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "failed" not in proc.stdout
    gpu = json.loads((tmp_path / "gpu-train.json").read_text())
    assert {(r["dtype"], r["compiled"]) for r in gpu["rows"]} == {("fp32", False), ("bf16", False), ("bf16", True)}
    assert max(gpu["flex_max_abs_diff"]) < 1e-4 and all(r["mfu"] > 0 for r in gpu["rows"])
    sample = json.loads((tmp_path / "sample.json").read_text())
    assert [r["width"] for r in sample["cache"]] == ["d/4", "d/16"]  # cached == uncached is asserted there
    assert json.loads((tmp_path / "train.json").read_text())["rows"]
