"""The benchmark's report: run the smoke suite (tiny models, no Ray) and check the JSON's schema.

Timings are not checked: they depend on the machine. Every key the issue asks for must be there with
the right type; the pipeline's keys are null in this suite, with a reason.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the smoke benchmark suite

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("speedup_vs_naive", "forward_fraction", "chunk_scoring_ratio", "pipeline_vs_engine",
        "batch_scaling", "actor_scaling", "peak_rss_mb")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run([sys.executable, "-m", "jobs.bench", "--suite", "smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| speedup_vs_naive |" in done.stdout  # the Markdown table is printed
    return json.loads(out.read_text())


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_top_level_sections(report):
    assert report["suite"] == "smoke"
    assert set(report) >= {"suite", "command", "machine", "versions", "settings", "results", "targets", "met",
                           "markdown"}
    assert {"cpu", "cpu_count", "memory_gb", "torch_threads", "device"} <= set(report["machine"])
    assert {"python", "torch", "transformers", "ray"} <= set(report["versions"])
    assert {"method", "new_tokens", "models", "naive", "stand_ins", "workloads"} <= set(report["settings"])
    m = report["settings"]["method"]
    assert (m["token"], m["chunk"], m["W"], m["K"], m["L"]) == ("implicit", "explicit", 4, 4, 5)


def test_results_hold_every_key_with_its_type(report):
    results = report["results"]
    for key in KEYS:
        assert key in results, key
    for key in ("speedup_vs_naive", "forward_fraction", "chunk_scoring_ratio"):
        assert is_number(results[key]), (key, results[key])
    assert 0 < results["forward_fraction"] <= 1
    assert set(results["batch_scaling"]) == {"1", "4"} and all(map(is_number, results["batch_scaling"].values()))
    assert {"base_weights", "implicit_weights", "explicit_weights", "process_peak"} <= set(results["peak_rss_mb"])
    for key in ("pipeline_vs_engine", "actor_scaling"):  # no Ray in the smoke suite: null, with a reason
        assert results[key] is None and results["reason"][key]
    assert set(results["by_model"]) == {"tiny"}
    assert all(results["measured_on"][k] in (None, "tiny") for k in KEYS)


def test_targets_and_met(report):
    assert set(report["targets"]) == {"speedup_vs_naive", "forward_fraction", "chunk_scoring_ratio",
                                      "pipeline_vs_engine"}
    for key, (op, value) in report["targets"].items():
        assert op in (">=", "<=") and is_number(value)
        assert report["met"][key] in ((None,) if report["results"][key] is None else (True, False))
