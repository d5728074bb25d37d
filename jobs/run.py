"""The main job: an experiment end to end. `python -m jobs.run [--config FILE] [--output DIR]`

    assets -> gold model -> prompts -> guides (trained, or reused from the cache) -> generate every
    method on Ray -> evaluate -> summary table, summary.parquet and report.md under runs/<name>/

The config is a generate config (pipeline/config.py) plus two sections this job consumes:
  experiment:  assets to fetch; where prompts come from (an asset or file, how many, prefixes);
               optionally `explicit_probe`: a reward probe fitted on labelled texts (ivg/probe.py)
               that becomes models.explicit
  train:       guide training (ivg/train.py); the trained folders become models.tuned/untuned
               (and models.explicit, a token reward model, unless the settings turn it off)
The default, jobs/configs/sentiment-default.yaml, runs offline on this 2-core CPU in minutes.
"""

import argparse
import functools
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import pandas as pd
import ray
import yaml

from ivg.assets import AssetFetchError, cache_root, fetch, resolve
from ivg.config import ConfigError, ModelSpec, check, from_dict
from ivg.gold import GoldSpec, GoldScorer, ensure_offline_sentiment, offline_dir
from ivg.probe import ProbeSettings, train_probe
from ivg.train import GuideConfig, train_guides
from pipeline.config import Config
from pipeline.coordinator import generate
from pipeline.eval_config import EvalConfig
from pipeline.evaluate import evaluate_run
from pipeline.report import markdown_table

DEFAULT = "jobs/configs/sentiment-default.yaml"
PROBE_VERSION = 1  # bump when ivg/probe.py changes what it fits
PROMPT_KEYS = {"path", "column", "id_column", "n", "train_n", "prefix_words", "min_words", "seed"}
PROBE_KEYS = {"body", "path", "text_column", "label_column", "settings", "out"}


def make_prompts(spec: dict, out: Path) -> tuple[Path, list[str]]:
    """Evaluation prompts (a JSONL with id, prompt) and a disjoint list of training prompts.

    The source is shuffled with a fixed seed and cut: the first train_n rows train the guides, the
    next n are evaluated, so no guide has seen an evaluation prompt."""
    unknown = sorted(set(spec) - PROMPT_KEYS)
    check(not unknown, "experiment.prompts", f"unknown key(s) {unknown}; known: {sorted(PROMPT_KEYS)}")
    path = spec["path"]
    if path.startswith("asset:"):
        path = str(resolve(path.removeprefix("asset:")))
    frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_json(path, lines=True)
    column, id_column = spec.get("column", "prompt"), spec.get("id_column", "id")
    for name, col in (("column", column), ("id_column", id_column)):
        check(col in frame.columns, f"experiment.prompts.{name}", f"{col!r} is not a column of {path}")
    words, min_words = spec.get("prefix_words"), spec.get("min_words", 0)
    rows = [(str(i), str(t)) for i, t in zip(frame[id_column], frame[column]) if len(str(t).split()) >= min_words]
    random.Random(spec.get("seed", 0)).shuffle(rows)
    if words:  # the opening words of a text, for the model to continue (IMDB-style prompts)
        rows = [(i, " ".join(t.split()[:words])) for i, t in rows]
    train_n, n = spec.get("train_n", 0), spec.get("n", len(rows))
    check(train_n + n <= len(rows), "experiment.prompts.n", f"train_n + n = {train_n + n} > {len(rows)} prompts")
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i, text in rows[train_n:train_n + n]:
            f.write(json.dumps({"id": i, "prompt": text}) + "\n")
    return prompts, [t for _, t in rows[:train_n]]


def gold_spec(data: dict) -> GoldSpec:
    gold = (data.get("eval") or {}).get("gold")
    check(isinstance(gold, dict), "eval.gold", "the main job needs a gold model to evaluate and to label guide training")
    return GoldSpec(**gold)


def ensure_gold(spec: GoldSpec, log) -> GoldSpec:
    """The offline sentiment gold model is trained once into the cache; others load as they are."""
    if spec.kind == "offline_sentiment":
        start = time.perf_counter()
        folder = ensure_offline_sentiment(offline_dir(spec.name))
        report = json.loads((folder / "gold_report.json").read_text())
        log(f"[gold] {folder}: held-out accuracy {report['accuracy']:.3f} (VADER {report['vader_accuracy']:.3f}), "
            f"ready in {time.perf_counter() - start:.0f}s")
    return spec


def guides(section: dict, train_prompts: list[str], gold: GoldSpec, log) -> dict:
    """Train (or reuse) the tuned model and the token reward model; returns their model specs."""
    fields = {k: v for k, v in section.items() if k != "gold"}
    config = from_dict(GuideConfig, {**fields, "gold": json.dumps(gold.__dict__, sort_keys=True)}, "train")
    scorer = GoldScorer(gold)
    paths = train_guides(config, train_prompts, scorer.score, log=log)
    return {role: dict(spec.__dict__) for role, spec in paths.models().items()}


def probe(spec: dict, log) -> dict:
    """The explicit value as a reward probe on labelled texts, cached by its settings."""
    unknown = sorted(set(spec) - PROBE_KEYS)
    check(not unknown, "experiment.explicit_probe", f"unknown key(s) {unknown}; known: {sorted(PROBE_KEYS)}")
    body = from_dict(ModelSpec, spec["body"], "experiment.explicit_probe.body")
    settings = from_dict(ProbeSettings, spec.get("settings", {}), "experiment.explicit_probe.settings")
    path = spec["path"]
    frame = pd.read_parquet(resolve(path.removeprefix("asset:")) if path.startswith("asset:") else path)
    text, label = spec.get("text_column", "text"), spec.get("label_column", "label")
    key = hashlib.sha256(json.dumps([spec, PROBE_VERSION], sort_keys=True).encode()).hexdigest()[:16]
    out = (Path(spec["out"]).expanduser() if "out" in spec else cache_root() / "probes") / key
    return dict(train_probe(body, list(frame[text]), list(frame[label]), out, settings, log).__dict__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT, help=f"experiment config (default: {DEFAULT})")
    p.add_argument("--output", help="run directory (default: runs/<run.name>)")
    p.add_argument("--num-cpus", type=float, help="CPUs of the embedded Ray (default: all)")
    args = p.parse_args(argv)
    log = functools.partial(print, flush=True)
    start = time.perf_counter()
    try:
        data = yaml.safe_load(Path(args.config).read_text())
        check(isinstance(data, dict), args.config, "the config must be a mapping")
        experiment, train = data.pop("experiment", None) or {}, data.pop("train", None)
        out = Path(args.output or f"runs/{(data.get('run') or {}).get('name', 'run')}")

        log(f"[assets] {', '.join(experiment.get('assets', [])) or 'none needed'}")
        fetch(experiment.get("assets", []), progress=lambda m: log(f"[assets] {m}"))
        gold = ensure_gold(gold_spec(data), log)
        prompts, train_prompts = make_prompts(experiment["prompts"], out)
        log(f"[prompts] {prompts} ({sum(1 for _ in open(prompts))} evaluation, {len(train_prompts)} training)")
        if train is not None:
            data["models"] = {**data["models"], **guides(train, train_prompts, gold, log)}
        if "explicit_probe" in experiment:
            data["models"] = {**data["models"], "explicit": probe(experiment["explicit_probe"], log)}
        data["data"] = {**(data.get("data") or {}), "path": str(prompts)}
        data["run"] = {**(data.get("run") or {}), "output": str(out)}
        config = from_dict(Config, data, "config")
    except (ConfigError, AssetFetchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=args.num_cpus, include_dashboard=False)
    try:
        result = generate(config, log=log)
    finally:
        ray.shutdown()
    if result.status != "finished":
        log(f"[generate] {result.status}: see {out / 'manifest.json'}")
        return 1
    log("[evaluate] gold rewards, summary, report")
    summary = evaluate_run(out, EvalConfig.from_dict(config.eval))
    log("\n" + markdown_table(summary))
    log(f"\n[done] {time.perf_counter() - start:.0f}s  summary: {out / 'summary.parquet'}  report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
