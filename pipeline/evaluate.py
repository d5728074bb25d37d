"""The evaluation stage over a finished generate run: gold rewards, AlpacaEval preferences, summary, report.

Layout of a run dir (inputs from generate, the rest written here):
    DIR/shards/*.parquet                      generate output rows (any *.parquet under shards/, recursively)
    DIR/evaluated/samples.parquet             every shard row, in the shards' own schema, sorted by (id, method),
                                              + gold_reward [+ judge_reward, reference, reference_reward,
                                              preference, judge], each derived column C with C_scorer
    DIR/evaluated/model_outputs/<method>.json its ok responses in alpaca_eval's model_outputs format
    DIR/evaluated/annotations/<method>.json   alpaca_eval annotations (alpaca only), instruction order
    DIR/evaluated/eval_config.json            the EvalConfig that produced them, and its scorers' identities
    DIR/summary.parquet                       one row per method (ivg/eval/summary.py)
    DIR/report.md, DIR/report.png             the summary table; gold reward vs model tokens and vs wall time
Both Parquet files carry the run's resolved config and fingerprint, the EvalConfig with its scorers and
the evaluating code's git revision in their metadata (`ivg.*` keys). Columns: README.md, "Outputs".
Re-running is idempotent: the files are rewritten whole (atomically), and scores already in
samples.parquet are reused for rows with the same (id, method) and response *and the same scorer*: every
derived column C has a column C_scorer holding `scorer_id(identity)` of what computed it (a hash of the
gold or judge spec and its weights, ivg.eval.gold.gold_identity), so a changed gold model, format or
retrained weights rescore, while device or batch size (speed only) do not.
Failed rows (status=failed) are kept and counted, never scored, and left out of every mean.
Scorers are plain callables `(prompts, responses) -> scores`: the Ray pipeline may pass actor-backed ones;
a scorer passed in is taken to compute what cfg.gold (or cfg.alpaca.judge_model) describes.
"""

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ivg.config import ConfigError
from ivg.eval.alpaca import api_annotations, length_controlled_winrate, offline_annotations
from ivg.eval.config import EvalConfig
from ivg.eval.gold import GoldScorer, gold_identity, scorer_id
from ivg.eval.report import write_report
from ivg.eval.summary import summarize
from ivg.files import write_text
from ivg.provenance import git_revision
from pipeline.io import InputError, child_path, write_parquet_atomic

Scorer = Callable[[list[str], list[str]], list[float]]
REQUIRED = ("id", "prompt", "response", "method", "status")
KEY = ["id", "method"]
log = logging.getLogger(__name__)


def evaluate_run(run_dir, cfg: EvalConfig, scorer: Scorer | None = None, judge: Scorer | None = None) -> pd.DataFrame:
    """Evaluate DIR in place; returns the summary. `scorer`/`judge` default to GoldScorers built from cfg."""
    run_dir = Path(run_dir)
    out_dir = run_dir / cfg.evaluated_dir
    table = read_shards(run_dir)
    rows = table.to_pandas(maps_as_pydicts="strict", integer_object_nulls=True)  # {role: tokens}; L: int or None
    prev = pd.read_parquet(out_dir / "samples.parquet") if (out_dir / "samples.parquet").exists() else None
    ok = rows["status"] == "ok"
    scorers = Scorers(cfg)

    if cfg.gold is not None:
        scorer = scorer or _lazy(lambda: GoldScorer(cfg.gold).score)
        reuse_or_score(rows, prev, "gold_reward", ok, scorer, scorers.gold)

    lc = {}
    if cfg.alpaca is not None:
        lc = _alpaca(rows, prev, cfg, ok, scorer, judge, scorers, out_dir / "annotations")

    summary = summarize(rows, lc, gold=cfg.gold.name if cfg.gold else None)
    made_by = {**asdict(cfg), "scorers": scorers.identities}  # each scorer id's identity
    meta = provenance(run_dir, made_by)
    write_text(out_dir / "eval_config.json", json.dumps(made_by, indent=2))
    write_parquet_atomic(with_derived(table, rows), out_dir / "samples.parquet", meta)
    write_parquet_atomic(pa.Table.from_pandas(summary, preserve_index=False), run_dir / cfg.summary, meta)
    write_model_outputs(rows, out_dir / "model_outputs")
    write_report(summary, run_dir / cfg.report, run_dir / cfg.plot, run=run_dir.name,
                 gold=cfg.gold.name if cfg.gold else None)
    return summary


def with_derived(table: pa.Table, rows: pd.DataFrame) -> pa.Table:
    """The shard rows as generate wrote them (their own types: maps, int32, null chunk scores) plus
    the columns evaluation added; `rows` is `table` in the same order, with those columns."""
    added = [c for c in rows.columns if c not in table.column_names]
    for name, column in zip(added, pa.Table.from_pandas(rows[added], preserve_index=False).columns):
        if pa.types.is_large_string(column.type):  # pandas' string dtype: the shards' own string type
            column = column.cast(pa.string())
        table = table.append_column(name, column)
    if "reference" in table.column_names and "reference" in rows.columns:  # references from elsewhere
        i = table.column_names.index("reference")
        table = table.set_column(i, "reference", pa.array(rows["reference"], pa.string()))
    return table


def provenance(run_dir: Path, made_by: dict) -> dict[str, str]:
    """Parquet metadata tying the evaluated numbers to what made them: the run's resolved config and
    fingerprint (as generate recorded them), the evaluation config with its scorers, and this code."""
    meta = {"ivg.eval": json.dumps(made_by, default=str), "ivg.eval_git": json.dumps(git_revision())}
    if (run_dir / "config.yaml").is_file():
        meta["ivg.config"] = json.dumps(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if (run_dir / "manifest.json").is_file():
        meta["ivg.fingerprint"] = json.loads((run_dir / "manifest.json").read_text()).get("fingerprint") or ""
    return meta


def write_model_outputs(rows: pd.DataFrame, folder: Path) -> None:
    """<method>.json per method: its ok responses as alpaca_eval's `--model_outputs` reads them."""
    instruction = "instruction" if "instruction" in rows.columns else "prompt"
    for method, g in rows[rows["status"] == "ok"].groupby("method", sort=True):
        records = [{"instruction": i, "output": o, "generator": method, **({"dataset": d} if d is not None else {})}
                   for i, o, d in zip(g[instruction], g["response"], g["dataset"] if "dataset" in g else [None] * len(g))]
        write_text(child_path(folder, f"{method}.json"), json.dumps(records, indent=1, ensure_ascii=False))


class Scorers:
    """The scorer id of each derived column's maker, and the identity behind every id."""

    def __init__(self, cfg: EvalConfig):
        self.identities: dict[str, dict] = {}
        self.gold = self.add(gold_identity(cfg.gold)) if cfg.gold is not None else None
        a = cfg.alpaca
        if a is None:
            self.judge = None
        elif a.judge != "offline":  # one of alpaca_eval's (API) annotators
            self.judge = self.add({"annotator": a.judge})
        else:  # the offline judge's reward model: judge_model, else the gold model
            self.judge = self.add(gold_identity(a.judge_model)) if a.judge_model is not None else self.gold

    def add(self, identity: dict) -> str:
        sid = scorer_id(identity)
        self.identities[sid] = identity
        return sid


def read_shards(run_dir: Path) -> pa.Table:
    """Every shard row, in the shards' own schema, sorted by (id, method); checked like DESIGN.md's rows."""
    files = sorted((Path(run_dir) / "shards").rglob("*.parquet"))
    if not files:
        raise InputError(f"{run_dir}/shards: no *.parquet files; is this a finished generate run?")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    table = table.replace_schema_metadata(None)  # each shard's own; the evaluated files get theirs
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise InputError(f"{run_dir}/shards: rows lack column(s) {missing} (DESIGN.md output rows)")
    df = table.select(REQUIRED).to_pandas()
    bad = ~df["status"].isin(["ok", "failed"])
    if bad.any():
        raise InputError(f"{run_dir}/shards: row {df.loc[bad, KEY].iloc[0].to_dict()} has status {df['status'][bad].iloc[0]!r}")
    dup = df.duplicated(KEY, keep=False)
    if dup.any():
        raise InputError(f"{run_dir}/shards: (id, method) {df.loc[dup, KEY].iloc[0].to_dict()} appears {int(dup.sum())} times")
    return table.sort_by([(k, "ascending") for k in KEY])  # results depend on (id, method), not on shard order


def reuse_or_score(rows, prev, column: str, todo: pd.Series, scorer: Scorer, sid: str,
                   text: str = "response") -> None:
    """Set rows[column] (and rows[column + "_scorer"] = sid) for rows with todo=True: from prev where
    (id, method, rows[text]) match and prev's value was made by the same scorer, else scored now."""
    out = pd.Series(np.nan, index=rows.index)
    by = f"{column}_scorer"
    if prev is not None and {column, by} <= set(prev.columns):
        old = prev.drop_duplicates(KEY).set_index(KEY)
        keys = pd.MultiIndex.from_frame(rows[KEY])
        same = (old[text].reindex(keys).to_numpy() == rows[text].to_numpy()) & (old[by].reindex(keys).to_numpy() == sid)
        out[same] = old[column].reindex(keys).to_numpy()[same]
    need = todo & out.isna()
    if need.any():
        scores = scorer(list(rows["prompt"][need]), list(rows[text][need]))
        if len(scores) != int(need.sum()):
            raise RuntimeError(f"scorer returned {len(scores)} scores for {int(need.sum())} texts ({column})")
        out[need] = np.asarray(scores, dtype=float)
    log.info("%s: %d reused, %d scored (scorer %s)", column, int((todo & ~need).sum()), int(need.sum()), sid)
    rows[column] = out.where(todo)
    rows[by] = _made_by(rows[column], sid)


def _alpaca(rows, prev, cfg, ok, scorer, judge, scorers: Scorers, annotations_dir) -> dict:
    """Adds reference, reference_reward, preference, judge columns (with their _scorer columns);
    returns {method: LC metrics}."""
    a = cfg.alpaca
    rows["reference"], index = _references(rows, a.reference)
    ok = ok & rows["reference"].notna()  # e.g. the reference method failed on that prompt
    instructions = rows["instruction"] if "instruction" in rows.columns else rows["prompt"]
    if a.judge == "offline":
        if a.judge_model is None:  # the gold model judges: its reward of each output is gold_reward
            judge, out_rewards = scorer, rows["gold_reward"]
        else:
            judge = judge or _lazy(lambda: GoldScorer(a.judge_model).score)
            reuse_or_score(rows, prev, "judge_reward", ok, judge, scorers.judge)
            out_rewards = rows["judge_reward"]
        # a reference is scored once per id (on its first ok row), whatever the number of methods
        first = ok & ~rows["id"].where(ok).duplicated()
        reuse_or_score(rows, prev, "reference_reward", first, judge, scorers.judge, text="reference")
        ref = rows["reference_reward"]
        rows["reference_reward"] = rows["id"].map(pd.Series(ref[first].to_numpy(), index=rows["id"][first])).where(ok)
        rows["reference_reward_scorer"] = _made_by(rows["reference_reward"], scorers.judge)
    lc = {}
    versus = a.reference.removeprefix("method:") if a.reference.startswith("method:") else None
    for method, g in rows[ok & (rows["method"] != versus)].groupby("method", sort=True):  # not against itself
        args = (list(instructions[g.index]), list(g["response"]), list(g["reference"]))
        if a.judge == "offline":
            ann = offline_annotations(*args, list(out_rewards[g.index]), list(g["reference_reward"]),
                                      list(index[g.index]), method, a.reference_generator)
        else:
            ann = api_annotations(*args, list(index[g.index]), method, a.reference_generator, a.judge)
        rows.loc[g.index, "preference"] = ann["preference"].to_numpy(dtype=float)
        rows.loc[g.index, "judge"] = ann["annotator"].iloc[0]
        ann = ann.sort_index()  # file order = instruction order, as alpaca_eval writes it
        annotations_dir.mkdir(parents=True, exist_ok=True)
        ann.to_json(child_path(annotations_dir, f"{method}.json"), orient="records", indent=1)
        lc[method] = length_controlled_winrate(ann, a.glm_inputs)
    if "preference" in rows.columns:
        rows["preference_scorer"] = _made_by(rows["preference"], scorers.judge)
    return lc


def _made_by(values: pd.Series, sid: str) -> pd.Series:
    return pd.Series(sid, index=values.index).where(values.notna())


def _references(rows: pd.DataFrame, source: str) -> tuple[pd.Series, pd.Series]:
    """(reference text, AlpacaEval instruction index) per row."""
    if source.startswith("method:"):  # another method's responses to the same prompts, e.g. the unguided base
        name = source.removeprefix("method:")
        theirs = rows[(rows["method"] == name) & (rows["status"] == "ok")].set_index("id")["response"]
        if theirs.empty:
            raise ConfigError(f"eval.alpaca.reference={source}: no ok rows of method {name!r}; "
                             f"methods: {sorted(rows['method'].unique())}")
        ref, idx = rows["id"].map(theirs), rows.get("alpaca_index")
    elif source == "column":
        if "reference" not in rows.columns:
            raise ConfigError("eval.alpaca.reference='column' but the rows have no `reference` column")
        ref, idx = rows["reference"], rows.get("alpaca_index")
    else:
        table = _read_table(source)
        if not {"id", "reference"} <= set(table.columns):
            raise ConfigError(f"eval.alpaca.reference={source}: needs columns id, reference; has {list(table.columns)}")
        table = table.set_index("id")
        missing = ~rows["id"].isin(table.index)
        if missing.any():
            raise ConfigError(f"eval.alpaca.reference={source}: no reference for id {rows['id'][missing].iloc[0]!r}")
        ref = rows["id"].map(table["reference"])
        idx = rows.get("alpaca_index", rows["id"].map(table["index"]) if "index" in table.columns else None)
    if idx is None and rows["id"].str.fullmatch(r"\d+").all():
        idx = rows["id"].astype(int)  # ids that are AlpacaEval indices (the alpaca-instructions asset)
    elif idx is None:
        # the GLM's instruction difficulty is looked up by this index: right only for the full set in order
        log.warning("no alpaca_index column: using id order as the AlpacaEval instruction index")
        idx = rows["id"].map({k: i for i, k in enumerate(sorted(rows["id"].unique()))})
    return ref, idx.astype(int)


def _read_table(path: str) -> pd.DataFrame:
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    return pd.read_json(path, lines=".jsonl" in path)


def _lazy(make: Callable[[], Scorer]) -> Scorer:
    """A scorer whose model loads on first use, so a fully reused re-run loads nothing."""
    cache = []

    def score(prompts, responses):
        if not cache:
            cache.append(make())
        return cache[0](prompts, responses)

    return score
