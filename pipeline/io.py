"""Prompts in, Parquet out: Arrow readers, stable shards, atomic files, and the run manifest.

Output layout of a run directory:
  DIR/config.yaml               the resolved config
  DIR/manifest.json             config, fingerprint, versions, git revision, runs, shard states
  DIR/shards/<shard-id>.parquet one file per shard: every method's row for each of its prompts
A shard file appears only complete (written to a temp name in the same folder, then renamed), so
"the file exists" means "the shard is done", which is all a rerun needs to skip it.
"""

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

# One row per (prompt, method); DESIGN.md's output contract, then the shard that made it.
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
    ("method", pa.string()), ("token", pa.string()), ("chunk", pa.string()),
    ("W", pa.int32()), ("K", pa.int32()), ("L", pa.int32()),
    ("beta_token", pa.float64()), ("beta_chunk", pa.float64()), ("seed", pa.int64()),
    ("n_new_tokens", pa.int32()),
    ("model_tokens", pa.map_(pa.string(), pa.int64())),  # role -> tokens its models processed
    ("wall_s", pa.float64()), ("score", pa.float64()),
    ("chunk_scores", pa.list_(pa.float64())),  # the kept beam's value after each chunk
    ("status", pa.string()), ("error", pa.string()), ("shard", pa.string()),
])
VERSIONED = ("ivg", "torch", "transformers", "ray", "pyarrow", "datasets", "numpy")


# ---------------------------------------------------------------- reading prompts

def read_prompts(path: str, source: str = "auto", *, split: str = "train", subset: str | None = None,
                 id_column: str | None = "id", prompt_column: str = "prompt", columns=(),
                 batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """Record batches with `id` (string), `prompt` and the carried `columns`, in input order."""
    kind = source if source != "auto" else _sniff(path)
    wanted = [c for c in (id_column, prompt_column, *columns) if c is not None]
    if kind == "parquet":
        file = pq.ParquetFile(path)
        _require(file.schema_arrow.names, wanted, path)
        batches = file.iter_batches(batch_size=batch_rows, columns=wanted)
    elif kind == "jsonl":
        reader = pa_json.open_json(path, read_options=pa_json.ReadOptions(block_size=1 << 20))
        _require(reader.schema.names, wanted, path)
        batches = (b.select(wanted) for b in reader)
    else:
        import datasets  # lazy: only HF sources need it

        ds = datasets.load_dataset(path, subset, split=split)
        _require(ds.column_names, wanted, path)
        batches = (b for t in ds.select_columns(wanted).with_format("arrow").iter(batch_rows)
                   for b in t.to_batches())
    start = 0
    for batch in batches:
        ids = (pa.array([str(start + i) for i in range(batch.num_rows)]) if id_column is None
               else batch.column(id_column).cast(pa.string()))
        start += batch.num_rows
        yield pa.RecordBatch.from_arrays([ids, batch.column(prompt_column)] + [batch.column(c) for c in columns],
                                         names=["id", "prompt", *columns])


def count_prompts(path: str, source: str = "auto") -> int | None:
    """Rows in the input when that is cheap to know (for progress); None for HF datasets."""
    kind = source if source != "auto" else _sniff(path)
    if kind == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if kind == "jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def _sniff(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "hf"


def _require(have, wanted, path) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; it has {list(have)} "
                         "(set data.id_column / data.prompt_column / data.columns)")


# ---------------------------------------------------------------- shards

@dataclass(frozen=True)
class Shard:
    index: int  # position in the input
    id: str  # "<index>-<hash of the ids>": the same prompts give the same id on every rerun
    rows: tuple[dict, ...]  # [n] {id, prompt, *carried columns}


def cut_shards(batches: Iterator[pa.RecordBatch], size: int, limit: int | None = None) -> Iterator[Shard]:
    """Re-chunk record batches into shards of `size` prompts; ids must be unique and non-null."""
    seen: set[str] = set()
    pending: list[dict] = []
    index = n = 0
    for batch in batches:
        for row in batch.to_pylist():
            if limit is not None and n >= limit:
                break
            if row["id"] is None:
                raise ValueError(f"input row {n} has a null id; ids must be unique strings")
            if row["id"] in seen:
                raise ValueError(f"input id {row['id']!r} appears twice; ids must be unique")
            seen.add(row["id"])
            pending.append(row)
            n += 1
            if len(pending) == size:
                yield make_shard(index, pending)
                index, pending = index + 1, []
    if pending:
        yield make_shard(index, pending)


def make_shard(index: int, rows: list[dict]) -> Shard:
    digest = hashlib.sha256("\x00".join(r["id"] for r in rows).encode()).hexdigest()[:12]
    return Shard(index, f"{index:06d}-{digest}", tuple(rows))


# ---------------------------------------------------------------- writing rows

def rows_to_table(rows: list[dict], columns=()) -> pa.Table:
    """Output rows (engine rows + shard + carried columns) as an Arrow table of OUTPUT_SCHEMA."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in OUTPUT_SCHEMA.names} for r in rows], schema=OUTPUT_SCHEMA)
    for c in columns:
        table = table.append_column(c, pa.array([r.get(c) for r in rows]))
    return table


def write_parquet_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `path` so that readers see the whole file or none: a temp file beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")  # not *.parquet: globs never see it
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_stale_temps(folder: Path) -> int:
    """Temp files left by an interrupted run (never renamed, so never a finished shard)."""
    stale = list(folder.glob("*.tmp-*")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# ---------------------------------------------------------------- manifest

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_revision() -> dict:
    """The checkout the code came from (None under `ray job submit`, whose upload has no .git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    if rev.returncode != 0:
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


class Manifest:
    """manifest.json: one JSON document, rewritten atomically after every change."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, path: Path, config: dict, fingerprint: str) -> "Manifest":
        """Load the manifest of a previous run into this directory, or start one; refuse a directory
        whose rows were made by another config (mixing them would make a meaningless table)."""
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("fingerprint") != fingerprint:
                raise ValueError(f"{path.parent} holds outputs of another config (fingerprint "
                                 f"{data.get('fingerprint')} != {fingerprint}); use a new output directory")
        else:
            data = {"fingerprint": fingerprint, "shards": {}, "runs": []}
        data["config"] = config
        return cls(path, data)

    def start_run(self, **info) -> None:
        self.data["runs"].append({"started": now(), "ended": None, "status": "running",
                                  "versions": versions(), "git": git_revision(), **info})
        self.save()

    def end_run(self, status: str, **info) -> None:
        self.data["runs"][-1].update(ended=now(), status=status, **info)
        self.save()

    def shard(self, shard_id: str, **state) -> None:
        self.data["shards"].setdefault(shard_id, {}).update(state)
        self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))
