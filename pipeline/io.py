"""Prompts in, Parquet out: Arrow readers, stable shards, atomic files, and the run manifest.

Output layout of a run directory:
  DIR/config.yaml               the resolved config
  DIR/manifest.json             config, fingerprint, versions, git revision, runs, shard states
  DIR/shards/<shard-id>.parquet one file per shard: every method's row for each of its prompts
  DIR/corrupt/<shard-id>.parquet shard files a rerun found truncated or corrupt (and computed again)
A shard file appears only complete (written to a temp name in the same folder, then renamed), and
the manifest records its row count and sha256; a rerun skips a shard whose file matches them, and
redoes one that is truncated or corrupt. A shard's file name is derived from its index and a hash of
its ids, never from user input, and is checked to stay inside the output directory.

Inputs: Parquet, CSV/TSV, JSON (an array of objects, or JSON lines), `datasets` save_to_disk folders
(Dataset or DatasetDict) and HF hub datasets (read_prompts). Input rows are checked as they are read.
A fault of the whole input (unsupported form, missing or mistyped column, unreadable or empty file,
null or duplicate id) is an `InputError` naming the path and the column or row; a fault of one prompt
(null, empty, text with no UTF-8 form) travels with its row as `error` and becomes a failed output
row, so its neighbours still run. Rows count from 0 in input order.
"""

import hashlib
import itertools
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ivg.files import atomic_path, sha256_file, write_text
from ivg.provenance import git_revision, versions

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
    ("status", pa.string()), ("error", pa.string()),
    ("truncated", pa.int32()),  # characters cut from the prompt's start to fit the context (data.truncate: left)
    ("shard", pa.string()),
])


# ---------------------------------------------------------------- reading prompts

class InputError(ValueError):
    """The input cannot be read as prompts; the message names the file, column or row."""


FORMATS = ("a Parquet file (.parquet), CSV (.csv, .tsv), JSON (.json: an array of objects, or one object per line), "
           "JSON lines (.jsonl, .ndjson), a datasets save_to_disk folder, or an HF hub dataset id")
SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}


def read_prompts(path: str, source: str = "auto", *, split: str = "train", subset: str | None = None,
                 id_column: str | None = "id", prompt_column: str = "prompt", columns=(),
                 batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """Record batches with `id`, `prompt` and the carried `columns`, in input order. The file is opened
    and its columns checked now, so a bad input fails before any actor starts; rows are read lazily.
    Sources: Parquet, CSV/TSV, JSON arrays and JSON lines, `Dataset.save_to_disk` folders (a Dataset,
    or a DatasetDict's `split`), and HF hub datasets (or folders of data files datasets can read)."""
    if ":" in path and not Path(path).exists():  # asset:<name> and the other schemes ivg.models knows
        from ivg.models import resolve_name

        path = resolve_name(path)
    kind = {"jsonl": "json"}.get(source, source) if source != "auto" else _sniff(path)
    wanted = [c for c in (id_column, prompt_column, *columns) if c is not None]
    try:
        if kind == "parquet":
            file = pq.ParquetFile(path)
            _check_schema(file.schema_arrow, id_column, prompt_column, wanted, path)
            batches = file.iter_batches(batch_size=batch_rows, columns=wanted)
        elif kind == "csv":
            batches = _csv_batches(path, id_column, prompt_column, wanted)
        elif kind == "json":
            batches = _json_batches(path, wanted, batch_rows)
            first = next(batches, None)
            if first is None:
                raise InputError(f"{path}: no prompts (the input has no rows)")
            _check_schema(first.schema, id_column, prompt_column, wanted, path)
            batches = itertools.chain([first], batches)
        else:
            ds = _dataset(path, kind, split, subset)
            _check_schema(ds.data.schema, id_column, prompt_column, wanted, path)
            batches = (b for t in ds.select_columns(wanted).with_format("arrow").iter(batch_rows)
                       for b in t.to_batches())
    except InputError:
        raise
    except pa.ArrowInvalid as e:
        if "Empty" in str(e):  # "Empty CSV file"
            raise InputError(f"{path}: no prompts (the file is empty)") from None
        raise InputError(f"{path}: cannot read it as {kind}: {e}") from None
    except Exception as e:  # missing, unreadable, not this format: say which file and why
        raise InputError(f"{path}: cannot read prompts ({type(e).__name__}: {e})") from None
    return _renamed(batches, path, id_column, prompt_column, columns)


def _renamed(batches, path, id_column, prompt_column, columns) -> Iterator[pa.RecordBatch]:
    start = 0
    try:
        for batch in batches:
            ids = (pa.array([str(start + i) for i in range(batch.num_rows)]) if id_column is None
                   else _ids_as_text(batch.column(id_column)))
            start += batch.num_rows
            yield pa.RecordBatch.from_arrays([ids, batch.column(prompt_column)] + [batch.column(c) for c in columns],
                                             names=["id", "prompt", *columns])
    except pa.ArrowInvalid as e:  # e.g. JSONL whose column changes type part way ("... in row N" of a block)
        raise InputError(f"{path}: reading from input row {start}: {e}") from None
    if start == 0:
        raise InputError(f"{path}: no prompts (the input has no rows)")


def _ids_as_text(column: pa.Array) -> pa.Array:
    return column if _is_text(column.type) else column.cast(pa.string())  # integers -> "3"


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _check_schema(schema: pa.Schema, id_column, prompt_column, wanted, path) -> None:
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; it has {schema.names} "
                         "(set data.id_column / data.prompt_column / data.columns)")
    if id_column is not None:
        t = schema.field(id_column).type
        if not (_is_text(t) or pa.types.is_integer(t)):
            raise InputError(f"{path}: column {id_column!r} (data.id_column) has type {t}; ids must be strings "
                             "or integers")
    t = schema.field(prompt_column).type
    if not (_is_text(t) or pa.types.is_null(t)):
        raise InputError(f"{path}: column {prompt_column!r} (data.prompt_column) has type {t}; prompts must "
                         "be strings")


def _sniff(path: str) -> str:
    p = Path(path)
    if p.is_dir():  # save_to_disk writes state.json (a Dataset) or dataset_dict.json (a DatasetDict)
        return "disk" if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() else "hf"
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None and p.exists():
        raise InputError(f"{path}: cannot read prompts from a {p.suffix or 'suffix-less'} file; expected {FORMATS}")
    return kind or "hf"  # a name that is not a file here: an HF hub dataset id


def _csv_batches(path, id_column, prompt_column, wanted) -> Iterator[pa.RecordBatch]:
    """CSV (or TSV) with a header row. Ids and prompts are read as text as written ("007" stays
    "007"); an empty field is an empty string; bytes that are not UTF-8 fail only their row."""
    import pyarrow.csv as pa_csv

    reader = pa_csv.open_csv(
        path, read_options=pa_csv.ReadOptions(block_size=1 << 20),
        parse_options=pa_csv.ParseOptions(delimiter="\t" if path.lower().endswith(".tsv") else ",",
                                          newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in (id_column, prompt_column) if c},
                                              check_utf8=False, strings_can_be_null=False))
    _check_schema(reader.schema, id_column, prompt_column, wanted, path)
    return (b.select(wanted) for b in reader)


def _json_batches(path, wanted, batch_rows) -> Iterator[pa.RecordBatch]:
    """A JSON array of objects, or JSON lines, as record batches of the `wanted` keys (those the first
    batch has: a key no row of it has is a missing column). A column keeps the JSON type it first has
    (a change is an error naming the row); a string with no UTF-8 form (bytes that are not UTF-8, an
    unpaired surrogate escape like "\\ud800") becomes bytes, which fail only their row (batch_rows)."""
    kinds: dict[str, tuple[str, int]] = {}  # column -> (JSON type, the row that set it)
    rows, keys = _json_rows(path), None
    while chunk := list(itertools.islice(rows, batch_rows)):
        keys = keys or [c for c in wanted if any(c in obj for _, obj in chunk)]
        columns = {}
        for c in keys:
            for n, obj in chunk:
                kind = _json_kind(obj.get(c))
                first = kinds.setdefault(c, (kind, n)) if kind != "null" else None
                if first and first[0] != kind:
                    raise InputError(f"{path}: column {c!r} changed from {first[0]} to {kind} in row {n}")
            columns[c] = _json_array([obj.get(c) for _, obj in chunk], path, c)
        yield pa.RecordBatch.from_pydict(columns)


def _json_rows(path) -> Iterator[tuple[int, dict]]:
    """(row number, object) in file order. Bytes are decoded with surrogateescape so that text that is
    not UTF-8 reaches its row (and fails it) instead of failing the file; blank lines are skipped."""
    with open(path, "rb") as f:
        head = f.read(1 << 12).lstrip(b"\xef\xbb\xbf \t\r\n")  # a BOM, whitespace
    if not head:
        raise InputError(f"{path}: no prompts (the file is empty)")
    if head.startswith(b"["):
        try:
            data = json.loads(Path(path).read_bytes().decode("utf-8", "surrogateescape").lstrip("\ufeff"))
        except ValueError as e:
            raise InputError(f"{path}: cannot read it as a JSON array: JSON parse error: {e}") from None
        for n, obj in enumerate(data):
            yield n, _json_object(obj, path, n)
        return
    n = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            text = line.decode("utf-8", "surrogateescape")
            try:
                obj = json.loads(text.lstrip("\ufeff") if line_no == 1 else text)
            except ValueError as e:
                raise InputError(f"{path}: cannot read it as jsonl: JSON parse error in row {n} (line {line_no}): "
                                 f"{e}") from None
            yield n, _json_object(obj, path, n)
            n += 1


def _json_object(obj, path, n) -> dict:
    if not isinstance(obj, dict):
        raise InputError(f"{path}: row {n} is a JSON {_json_kind(obj)}, not an object with named fields "
                         "(expected an array of objects, or one object per line)")
    return obj


def _json_kind(value) -> str:
    """JSON's own names for a value's type (as pyarrow's JSON reader words them)."""
    return ("null" if value is None else "boolean" if isinstance(value, bool) else
            "number" if isinstance(value, (int, float)) else "string" if isinstance(value, str) else
            "array" if isinstance(value, list) else "object")


def _json_array(values: list, path, column: str) -> pa.Array:
    if all(v is None or isinstance(v, str) for v in values):
        try:
            return pa.array(values, pa.string())
        except UnicodeEncodeError:  # some strings have no UTF-8 form
            return pa.array([None if v is None else _utf8_bytes(v) for v in values], pa.binary())
    try:
        return pa.array(values)
    except (pa.ArrowException, UnicodeEncodeError, TypeError) as e:
        raise InputError(f"{path}: column {column!r}: {e}") from None


def _utf8_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # the file's own bytes back
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")  # an unpaired surrogate escape: bytes that are not UTF-8


def _dataset(path: str, kind: str, split: str, subset: str | None):
    """A `datasets.Dataset`: a save_to_disk folder, else load_dataset (a hub id, or a folder of files)."""
    import datasets  # lazy: only these sources need it

    if kind == "disk":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"{path}: a DatasetDict without the split {split!r} (data.split); it has {sorted(ds)}")
            ds = ds[split]
        return ds
    if not Path(path).exists() and not datasets.config.HF_HUB_OFFLINE:
        from ivg.eval.alpaca import hub_reachable

        if not hub_reachable():  # datasets would retry for half a minute before saying so
            raise InputError(f"{path}: not a file or folder here, and the HF hub is unreachable to load it as a "
                             f"dataset id (HF_HUB_OFFLINE=1 uses the HF cache); expected {FORMATS}")
    return datasets.load_dataset(path, subset, split=split)


# ---------------------------------------------------------------- shards

@dataclass(frozen=True)
class Shard:
    index: int  # position in the input
    id: str  # "<index>-<hash of the ids>": the same prompts give the same id on every rerun
    rows: tuple[dict, ...]  # [n] {id, prompt, *carried columns, error: why this prompt cannot run, or None}


def cut_shards(batches: Iterator[pa.RecordBatch], size: int, limit: int | None = None) -> Iterator[Shard]:
    """Re-chunk record batches into shards of `size` prompts; ids must be unique and non-null (an id
    keys its output rows and the resume: a duplicate would silently overwrite, so it is an error)."""
    first_row: dict[str, int] = {}  # id -> the row it first appeared in
    pending: list[dict] = []
    index = n = 0
    for batch in batches:
        for row in batch_rows(batch):
            if limit is not None and n >= limit:
                break
            if row["id"] is None:
                raise InputError(f"input row {n}: the id is null (data.id_column); ids must be unique strings")
            if "id" in row["error"]:
                raise InputError(f"input row {n}: {row['error']['id']}; ids must be unique strings")
            if row["id"] in first_row:
                raise InputError(f"input rows {first_row[row['id']]} and {n}: id {row['id']!r} appears twice; "
                                 "ids must be unique (they key the output rows and the resume)")
            first_row[row["id"]] = n
            pending.append(check_prompt(row))
            n += 1
            if len(pending) == size:
                yield make_shard(index, pending)
                index, pending = index + 1, []
    if pending:
        yield make_shard(index, pending)


def batch_rows(batch: pa.RecordBatch) -> list[dict]:
    """The batch as dicts; text that is not valid UTF-8 is decoded with replacement characters and the
    row's `error` ({column: why}) names the column and byte (pyarrow's to_pylist would fail the batch)."""
    columns, errors = {}, [{} for _ in range(batch.num_rows)]
    for name, col in zip(batch.schema.names, batch.columns):
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                col = col.view(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary())
        values = col.to_pylist()
        for i, v in enumerate(values):
            if isinstance(v, bytes):
                try:
                    values[i] = v.decode("utf-8")
                except UnicodeDecodeError as e:
                    values[i] = v.decode("utf-8", errors="replace")
                    errors[i].setdefault(name, f"{name} is not valid UTF-8 (byte {e.start})")
        columns[name] = values
    return [{**{k: v[i] for k, v in columns.items()}, "error": errors[i]} for i in range(batch.num_rows)]


def check_prompt(row: dict) -> dict:
    """The row with `error` set to why its prompt cannot run (None if it can)."""
    p = row["prompt"]
    error = "; ".join(row["error"].values()) or (
        "prompt is null" if p is None else "prompt is empty" if not p.strip() else None)
    return {**row, "error": error}


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


def write_parquet_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write `path` so that readers see the whole file or none; returns its sha256, for the manifest."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
        digest = sha256_file(tmp)
    return digest


def child_path(folder: Path, name: str) -> Path:
    """folder/name, refusing a name that would land anywhere else (separators, `..`, absolute)."""
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or path.resolve().parent != folder.resolve():
        raise ValueError(f"{name!r} is not a plain file name inside {folder}")
    return path


# ---------------------------------------------------------------- manifest

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """manifest.json: one JSON document, rewritten atomically after every change."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, path: Path, config: dict, fingerprint: str) -> "Manifest":
        """Load the manifest of a previous run into this directory, or start one; refuse a directory
        whose rows were made by another config (mixing them would make a meaningless table)."""
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except ValueError as e:  # written atomically, so only an outside edit gets here
                raise ValueError(f"{path}: not valid JSON ({e}); fix it or use a new output directory") from None
            if data.get("fingerprint") != fingerprint:
                raise ValueError(f"{path.parent} holds outputs of another config (fingerprint "
                                 f"{data.get('fingerprint')} != {fingerprint}); use a new output directory")
        else:
            data = {"fingerprint": fingerprint, "shards": {}, "runs": []}
        data["config"] = config
        return cls(path, data)

    def start_run(self, **info) -> None:
        for run in self.data["runs"]:
            if run["status"] == "running":  # its driver was killed: it never got to say how it ended
                run["status"] = "died"
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
        write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))
