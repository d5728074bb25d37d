"""The distributed pipeline gives exactly the in-process engine's rows, whatever the placement,
shard size or number of search actors, and its servers really merge searches into one forward."""

import time

import pytest
import ray

from ivg.engine import Engine
from pipeline.coordinator import generate
from pipeline_fixtures import PROMPTS, comparable, ray_local, read_rows, tiny_config, write_prompts  # noqa: F401

METHODS = [
    {"token": "none", "chunk": "none"},
    {"token": "implicit", "chunk": "explicit", "W": 2, "K": 2, "L": 3},
    {"token": "explicit", "chunk": "implicit", "W": 2, "K": 2, "L": 3},
]
TOO_LONG = "x" * 2000  # longer than the tiny models' 1024-token context: a failed row, not a failed shard


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """Rows of the in-process engine (ivg.engine.Engine.local), one method at a time."""
    folder = tmp_path_factory.mktemp("expected")
    config = tiny_config(write_prompts(folder / "p.jsonl", PROMPTS + [TOO_LONG]), folder / "out", METHODS)
    engine = Engine.local(config.generation)
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS + [TOO_LONG])]
    return sorted(comparable(r) for m in config.methods for r in engine.run(rows, m))


@pytest.mark.parametrize("placement,shard_size", [("colocated", 3), ("separate", 2)])
def test_pipeline_rows_equal_in_process_engine(ray_local, expected, tmp_path, placement, shard_size):
    prompts = PROMPTS + [TOO_LONG, None]  # p9: a null prompt, which only the pipeline sees
    config = tiny_config(write_prompts(tmp_path / "p.jsonl", prompts), tmp_path / "out", METHODS,
                         placement=placement, shard_size=shard_size, search_actors=2, batch_window_ms=20)
    summary = generate(config)

    assert (summary.status, summary.placement, summary.failed) == ("finished", placement, 0)
    assert summary.done == -(-len(prompts) // shard_size) >= 3
    rows = read_rows(tmp_path / "out")
    assert sorted(comparable(r) for r in rows if r["id"] != "p9") == expected
    assert {r["dataset"] for r in rows} == {"test"}  # carried input column
    failed = {r["id"]: r["error"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {"p8", "p9"} and "exceeds the context" in failed["p8"]
    assert failed["p9"] == "prompt is null"

    # dynamic batching: some forward of the base server served both search actors at once
    base = summary.servers["colocated[0]" if placement == "colocated" else "base[0]"]
    assert max(int(n) for n in base["sessions_per_forward"]) >= 2, base
    assert base["forwards"] < base["next_requests"]
    if placement == "separate":
        assert set(summary.servers) == {"base[0]", "implicit[0]", "explicit[0]"}
    assert_actors_released()


def assert_actors_released(timeout_s: float = 30):
    """The run killed its actors: the cluster's CPUs are all free again."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
