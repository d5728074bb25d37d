"""Shared pieces of the pipeline tests: an embedded Ray per module, tiny-model configs, prompt files."""

import json
import os
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import ray

from pipeline.config import Config, load_config
from ivg.config import from_dict

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
PROMPTS = ["the movie was", "a", "I loved this film so much that I", "Plot: two friends, one dog",
           "what a waste of", "The acting", "Honestly, the ending", "Best film of the year:"]
# auth off: the embedded cluster is private to the test process, and token mode would write ~/.ray
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def ray_local():
    """One embedded 2-CPU Ray for a test module (starting Ray costs seconds; share it)."""
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def write_prompts(path: Path, prompts=PROMPTS, extra=None) -> Path:
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt": p, "dataset": "test", **(extra or {})}) + "\n")
    return path


def tiny_config(input: Path, output: Path, methods: list[dict], **pipeline) -> Config:
    """The smoke config's models (float64 tiny) with other data, methods and pipeline settings."""
    base = load_config(SMOKE).resolved()
    base["data"] = {"path": str(input), "columns": ["dataset"]}
    base["run"] = {"name": "test", "seed": 3, "output": str(output)}
    base["methods"] = methods
    base["pipeline"] = {**base["pipeline"], **pipeline}
    return from_dict(Config, base, "config")


def read_rows(output: Path) -> list[dict]:
    return pads.dataset(output / "shards", format="parquet").to_table().to_pylist()


def comparable(row: dict) -> tuple:
    """A row without its timing; scores to 9 places (padding reorders float additions)."""
    mt = row["model_tokens"]
    mt = dict(mt) if isinstance(mt, list) else mt  # Parquet maps read back as [(key, value)]
    return (row["id"], row["method"], row["response"], row["n_new_tokens"], tuple(sorted(mt.items())),
            None if row["score"] is None else round(row["score"], 9),
            tuple(round(s, 9) for s in row["chunk_scores"]), row["status"], row["error"])
