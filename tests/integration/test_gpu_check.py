"""scripts/gpu_check.sh's CPU dry run: every code path the GPU machine will run, on tiny shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # builds and decodes with every role, and the naive baselines


def test_cpu_dry_run_writes_every_section(tmp_path):
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--tiny", "--skip", "bench", "--naive-prompts", "1", "--out", str(tmp_path)],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=500)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert sections["exactness"]["all_cells_equal_reference"] is True
    assert len(sections["exactness"]["engine_equals_reference"]) == 3  # the full run checks all 9
    shapes = [s for name, s in sections.items() if name.startswith("W")]
    assert len(shapes) == 3 and all(s["status"] == "ok" for s in shapes)
    for s in shapes:
        assert s["ivg_sampled_tokens_per_s"] > 0 and s["plain_sampled_tokens_per_s"] > 0
        assert 0 < s["forward_fraction"] <= 1 and s["speedup_vs_naive"] > 0
    assert report["machine"]["device"] == "cpu"


def test_no_cuda_is_a_clear_error_not_a_crash(tmp_path):
    code = "import torch; torch.cuda.is_available = lambda: False; import runpy, sys; " \
           f"sys.argv = ['gpu_check.py', '--out', {str(tmp_path)!r}]; runpy.run_path('scripts/gpu_check.py', run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA device visible" in run.stderr
