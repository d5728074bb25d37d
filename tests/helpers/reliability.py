"""Shared pieces of the reliability tests: the in-process reference rows and exact row comparison."""

from collections import Counter

from ivg.engine import Engine
from pipeline.config import Config
from pipeline.io import cut_shards, read_prompts

METHODS = [{"token": "none", "chunk": "none"},
           {"token": "implicit", "chunk": "explicit", "W": 2, "K": 2, "L": 3}]
LABELS = ("base", "tok-implicit+cbs-explicit")
TIMING = ("wall_s", "shard")  # how long a row took and which shard file holds it: not its content


def reference_rows(config: Config) -> dict:
    """(id, method) -> the in-process engine's row for every prompt of the config's input."""
    d = config.data
    rows = [r for s in cut_shards(read_prompts(d.path, columns=d.columns), 10**9) for r in s.rows]
    engine = Engine.local(config.generation, d.truncate)
    good = [r for r in rows if r["error"] is None]
    return {(r["id"], r["method"]): content(r) for m in config.methods for r in engine.run(good, m)}


def content(row: dict) -> dict:
    """A row as data: timing left out, Parquet's map read back as a dict, floats to 9 places (the
    order of float additions differs between batch compositions; tokens and text never do)."""
    out = {}
    for k, v in row.items():
        if k in TIMING or k in ("dataset",):
            continue
        if k == "model_tokens":
            v = dict(v)
        elif isinstance(v, float):
            v = round(v, 9)
        elif k == "chunk_scores" and v is not None:  # None: the method has no chunk-level scorer
            v = [round(x, 9) for x in v]
        out[k] = v
    return out


def exactly_once(rows: list[dict], ids, labels=LABELS) -> bool:
    return Counter((r["id"], r["method"]) for r in rows) == Counter((i, m) for i in ids for m in labels)
