"""Shared pieces of the pipeline tests: tiny-model configs, prompt files, reading rows back."""

import json
import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pyarrow.dataset as pads

from pipeline.config import Config, load_config
from ivg.config import from_dict

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
PROMPTS = ["the movie was", "a", "I loved this film so much that I", "Plot: two friends, one dog",
           "what a waste of", "The acting", "Honestly, the ending", "Best film of the year:"]
# auth off: the embedded cluster is private to the test process, and token mode would write ~/.ray
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


@contextmanager
def ray_driver(**init):
    """This process as a Ray driver (`ray.init(**init)`, log_to_driver off) with RAY_ENV set, both
    undone on exit."""
    import ray

    with mock.patch.dict(os.environ, RAY_ENV):
        ray.init(log_to_driver=False, **init)
        try:
            yield
        finally:
            ray.shutdown()


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


def jsonl(path, *lines: bytes):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path
