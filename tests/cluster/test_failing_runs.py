"""Bad rows and bad models through a running pipeline: a failed row with its reason, or the run failing
with one line naming the server or the resource, never a hang."""

import dataclasses
import json

import pytest

from ivg.config import ModelSpec
from pipeline.coordinator import StartError, generate
from helpers.models import huge_model_folder
from helpers.pipeline import jsonl, read_rows, tiny_config, write_prompts
from helpers.reliability import METHODS, content, reference_rows

LONG = "x" * 2000  # the tiny models' context is 1024 tokens (characters)


@pytest.mark.timeout(120)
def test_bad_rows_through_the_pipeline_fail_alone(ray_local, tmp_path):
    lines = [json.dumps({"id": f"p{i}", "prompt": p, "dataset": "t"}).encode()
             for i, p in enumerate(["the movie was", None, "", LONG, "Plot: two friends"])]
    lines.insert(2, b'{"id": "u", "prompt": "na\xefve", "dataset": "t"}')
    path = jsonl(tmp_path / "p.jsonl", *lines)
    config = tiny_config(path, tmp_path / "out", METHODS, shard_size=3, search_actors=2)
    config = type(config)(**{**config.__dict__, "data": type(config.data)(**{**config.data.__dict__, "truncate": "left"})})
    summary = generate(config)
    assert (summary.status, summary.failed) == ("finished", 0)
    rows = {(r["id"], r["method"]): r for r in read_rows(tmp_path / "out")}
    assert len(rows) == 6 * 2
    errors = {i: rows[(i, "base")]["error"] for i in ("p1", "u", "p2")}
    assert errors == {"p1": "prompt is null", "u": "prompt is not valid UTF-8 (byte 2)", "p2": "prompt is empty"}
    assert all(rows[(i, m)]["status"] == "failed" for i in errors for m in ("base", "tok-implicit+cbs-explicit"))
    assert rows[("p3", "base")]["truncated"] > 0  # cut, not failed
    reference = reference_rows(config)  # the good prompts, run alone in-process
    assert {k: content(r) for k, r in rows.items() if k[0] in ("p0", "p3", "p4")} == reference


@pytest.mark.timeout(90)
def test_a_server_that_cannot_load_its_model_fails_the_run_naming_it(ray_local, tmp_path):
    config = tiny_config(write_prompts(tmp_path / "p.jsonl"), tmp_path / "out", METHODS[:1])
    base = ModelSpec(str(huge_model_folder(tmp_path / "huge")), device="cpu")
    config = type(config)(**{**config.__dict__, "models": type(config.models)(**{**config.models.__dict__, "base": base})})
    with pytest.raises(StartError, match=r"model server ivg-colocated-0 failed to start: MemoryError: .*huge"):
        generate(config)
    assert not (tmp_path / "out").exists()  # a failed start leaves nothing behind


@pytest.mark.timeout(90)
def test_device_cuda_without_cuda_fails_at_load_with_one_line(ray_local, tmp_path):
    """The driver's preflight cannot know the nodes' GPUs; the server says it in one line."""
    config = tiny_config(write_prompts(tmp_path / "p.jsonl"), tmp_path / "out", METHODS[:1])
    base = dataclasses.replace(config.models.base, device="cuda")
    config = dataclasses.replace(config, models=dataclasses.replace(config.models, base=base))
    with pytest.raises(StartError) as e:
        generate(config)
    assert str(e.value).startswith("model server ivg-colocated-0 failed to start: RuntimeError: device 'cuda': torch")
    assert "sees no CUDA device" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(90)
def test_resources_no_node_has_fail_the_run_instead_of_waiting_forever(ray_local, tmp_path):
    (tmp_path / "out").mkdir()  # an existing directory: the manifest it keeps records the failed start
    config = tiny_config(write_prompts(tmp_path / "p.jsonl"), tmp_path / "out", METHODS[:1], start_timeout_s=3,
                         servers={"colocated": {"num_cpus": 0.5, "num_gpus": 1}})
    with pytest.raises(StartError, match=r"model server ivg-colocated-0 did not start within pipeline.start_timeout_s=3s"):
        generate(config)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "error"
