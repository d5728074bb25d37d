"""The evaluation stage over a finished generate run: gold rewards, AlpacaEval preferences, summary, report.

Layout of a run dir (inputs from generate, the rest written here):
    DIR/shards/*.parquet                      generate output rows (any *.parquet under shards/, recursively)
    DIR/evaluated/samples.parquet             every row + gold_reward [+ reference_reward, preference, judge]
    DIR/evaluated/annotations/<method>.json   alpaca_eval annotations (alpaca only), instruction order
    DIR/evaluated/eval_config.json            the EvalConfig that produced them
    DIR/summary.parquet                       one row per method (see `summarize`)
    DIR/report.md, DIR/report.png             the summary table; gold reward vs model-token cost
Re-running is idempotent: the files are rewritten whole (atomically), and scores already in
samples.parquet are reused for rows with the same (id, method) and response, so only new rows are scored.
Failed rows (status=failed) are kept and counted, never scored, and left out of every mean.
A run whose generation is unfinished (its manifest's last run did not finish, or a shard is not done)
is refused: its summary would silently cover only the shards present. With `partial=True` it is
evaluated anyway and every summary row says `partial: true` (the column is false otherwise).
Scorers are plain callables `(prompts, responses) -> scores`: the Ray pipeline may pass actor-backed ones.
"""

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ivg.eval.alpaca import api_annotations, length_controlled_winrate, offline_annotations
from ivg.eval.config import EvalConfig
from ivg.eval.gold import GoldScorer
from ivg.eval.report import write_report
from ivg.eval.summary import as_dict, summarize
from ivg.files import atomic_path
from pipeline.io import child_path

Scorer = Callable[[list[str], list[str]], list[float]]
REQUIRED = ("id", "prompt", "response", "method", "status")
KEY = ["id", "method"]
log = logging.getLogger(__name__)


def evaluate_run(run_dir, cfg: EvalConfig, scorer: Scorer | None = None, judge: Scorer | None = None,
                 partial: bool = False) -> pd.DataFrame:
    """Evaluate DIR in place; returns the summary. `scorer`/`judge` default to GoldScorers built from cfg."""
    run_dir = Path(run_dir)
    out_dir = run_dir / cfg.evaluated_dir
    unfinished = unfinished_generation(run_dir)
    if unfinished and not partial:
        raise ValueError(f"{run_dir}: generation is unfinished ({unfinished}); finish it (run jobs.generate into it "
                         "again) or evaluate with --partial, which labels every summary row partial")
    rows = read_shards(run_dir)
    prev = pd.read_parquet(out_dir / "samples.parquet") if (out_dir / "samples.parquet").exists() else None
    ok = rows["status"] == "ok"

    if cfg.gold is not None:
        scorer = scorer or _lazy(lambda: GoldScorer(cfg.gold).score)
        rows["gold_reward"] = reuse_or_score(rows, prev, "gold_reward", ok, scorer)

    lc = {}
    if cfg.alpaca is not None:
        lc = _alpaca(rows, prev, cfg, ok, scorer, judge, out_dir / "annotations")

    summary = summarize(rows, lc)
    summary["partial"] = unfinished is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_config.json").write_text(json.dumps(asdict(cfg), indent=2))  # what made these numbers
    _write_parquet(rows, out_dir / "samples.parquet")
    _write_parquet(summary, run_dir / cfg.summary)
    title = f"Evaluation of {run_dir.name}" + (f" (PARTIAL: generation unfinished, {unfinished})" if unfinished else "")
    write_report(summary, run_dir / cfg.report, run_dir / cfg.plot, title=title)
    return summary


def unfinished_generation(run_dir: Path) -> str | None:
    """Why the generate run in DIR is not complete, from its manifest; None if it is, or if DIR has no
    manifest (rows that did not come from jobs.generate: nothing says what complete would be)."""
    path = run_dir / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    runs = manifest.get("runs") or [{"status": None}]
    if runs[-1]["status"] != "finished":
        return f"its last generate run is {runs[-1]['status']!r}, not 'finished'"
    pending = sorted(k for k, s in manifest.get("shards", {}).items() if s.get("state") not in ("done", "replaced"))
    if pending:
        return f"{len(pending)} shard(s) not done, e.g. {pending[0]}"
    return None


def read_shards(run_dir: Path) -> pd.DataFrame:
    files = sorted((Path(run_dir) / "shards").rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/shards: no *.parquet files; is this a finished generate run?")
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if "model_tokens" in df.columns:  # a Parquet map reads back as (key, value) pairs: make it a dict again
        df["model_tokens"] = df["model_tokens"].map(as_dict)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{run_dir}/shards: rows lack column(s) {missing} (DESIGN.md output rows)")
    bad = ~df["status"].isin(["ok", "failed"])
    if bad.any():
        raise ValueError(f"{run_dir}/shards: row {df.loc[bad, KEY].iloc[0].to_dict()} has status {df['status'][bad].iloc[0]!r}")
    dup = df.duplicated(KEY, keep=False)
    if dup.any():
        raise ValueError(f"{run_dir}/shards: (id, method) {df.loc[dup, KEY].iloc[0].to_dict()} appears {int(dup.sum())} times")
    return df.sort_values(KEY, ignore_index=True)  # results depend on (id, method), not on shard order


def reuse_or_score(rows, prev, column: str, todo: pd.Series, scorer: Scorer, text: str = "response") -> pd.Series:
    """`column` for rows with todo=True: from prev where (id, method, rows[text]) match, else scored now."""
    out = pd.Series(np.nan, index=rows.index)
    if prev is not None and column in prev.columns:
        old = prev.drop_duplicates(KEY).set_index(KEY)
        keys = pd.MultiIndex.from_frame(rows[KEY])
        same = old[text].reindex(keys).to_numpy() == rows[text].to_numpy()
        out[same] = old[column].reindex(keys).to_numpy()[same]
    need = todo & out.isna()
    if need.any():
        scores = scorer(list(rows["prompt"][need]), list(rows[text][need]))
        if len(scores) != int(need.sum()):
            raise RuntimeError(f"scorer returned {len(scores)} scores for {int(need.sum())} texts ({column})")
        out[need] = np.asarray(scores, dtype=float)
    log.info("%s: %d reused, %d scored", column, int((todo & ~need).sum()), int(need.sum()))
    return out.where(todo)


def _alpaca(rows, prev, cfg, ok, scorer, judge, annotations_dir) -> dict:
    """Adds reference, reference_reward, preference, judge columns; returns {method: LC metrics}."""
    a = cfg.alpaca
    rows["reference"], index = _references(rows, a.reference)
    ok = ok & rows["reference"].notna()  # e.g. the reference method failed on that prompt
    instructions = rows["instruction"] if "instruction" in rows.columns else rows["prompt"]
    if a.judge == "offline":
        if a.judge_model is None:  # the gold model judges: its reward of each output is gold_reward
            judge, out_rewards = scorer, rows["gold_reward"]
        else:
            judge = judge or _lazy(lambda: GoldScorer(a.judge_model).score)
            out_rewards = reuse_or_score(rows, prev, "judge_reward", ok, judge)
        # a reference is scored once per id (on its first ok row), whatever the number of methods
        first = ok & ~rows["id"].where(ok).duplicated()
        ref = reuse_or_score(rows, prev, "reference_reward", first, judge, text="reference")
        rows["reference_reward"] = rows["id"].map(pd.Series(ref[first].to_numpy(), index=rows["id"][first])).where(ok)
        if a.judge_model is not None:
            rows["judge_reward"] = out_rewards
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
    return lc


def _references(rows: pd.DataFrame, source: str) -> tuple[pd.Series, pd.Series]:
    """(reference text, AlpacaEval instruction index) per row."""
    if source.startswith("method:"):  # another method's responses to the same prompts, e.g. the unguided base
        name = source.removeprefix("method:")
        theirs = rows[(rows["method"] == name) & (rows["status"] == "ok")].set_index("id")["response"]
        if theirs.empty:
            raise ValueError(f"eval.alpaca.reference={source}: no ok rows of method {name!r}; "
                             f"methods: {sorted(rows['method'].unique())}")
        ref, idx = rows["id"].map(theirs), rows.get("alpaca_index")
    elif source == "column":
        if "reference" not in rows.columns:
            raise ValueError("eval.alpaca.reference='column' but the rows have no `reference` column")
        ref, idx = rows["reference"], rows.get("alpaca_index")
    else:
        table = _read_table(source)
        if not {"id", "reference"} <= set(table.columns):
            raise ValueError(f"eval.alpaca.reference={source}: needs columns id, reference; has {list(table.columns)}")
        table = table.set_index("id")
        missing = ~rows["id"].isin(table.index)
        if missing.any():
            raise ValueError(f"eval.alpaca.reference={source}: no reference for id {rows['id'][missing].iloc[0]!r}")
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


def _write_parquet(df: pd.DataFrame, path: Path):
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
