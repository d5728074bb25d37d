"""The main job: an experiment end to end. `python -m jobs.run [--config FILE] [--output DIR]`

    assets -> gold model -> prompts -> guides (trained, or reused from the cache) -> generate every
    method on Ray -> evaluate -> summary table, summary.parquet and report.md under runs/<name>/

The config is a generate config (pipeline/config.py) whose `experiment:` section says which assets to
fetch, where prompts come from and (optionally) which reward probe becomes models.explicit, and whose
`train:` section trains the guides (ivg/train/) on the prompts after the evaluated ones: the trained
folders become models.tuned/untuned (and models.explicit, the token reward model, unless
`train.token_rm: null`). The resolved config written
with the run records every section, so a run says how its guides and probe were made.
The default, jobs/configs/sentiment-default.yaml, runs offline on this 2-core CPU in minutes.
"""

import argparse
import dataclasses
import functools
import json
import os
import random
import sys
import time
from pathlib import Path

import pandas as pd
import ray

from ivg.config import ConfigError, check, from_dict
from ivg.eval.config import GoldSpec
from ivg.eval.gold import GoldScorer, ensure_offline_sentiment, offline_dir
from ivg.eval.report import markdown_table
from ivg.models import resolve_name
from ivg.offline.assets import AssetFetchError, fetch
from pipeline.config import Config, PromptsConfig, read_yaml
from pipeline.coordinator import generate
from pipeline.evaluate import evaluate_run

DEFAULT = "jobs/configs/sentiment-default.yaml"


def read_prompt_table(spec: PromptsConfig, where: str) -> list[tuple[str, str]]:
    """(id, text) rows of the prompt table, shuffled with spec.seed, openings cut to spec.prefix_words."""
    path = resolve_name(spec.path)
    frame = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_json(path, lines=True)
    for name in ("column", "id_column"):
        check(getattr(spec, name) in frame.columns, f"{where}.{name}", f"{getattr(spec, name)!r} is not a column of {path}")
    rows = [(str(i), str(t)) for i, t in zip(frame[spec.id_column], frame[spec.column])
            if len(str(t).split()) >= spec.min_words]
    random.Random(spec.seed).shuffle(rows)
    if spec.prefix_words:  # the opening words of a text, for the model to continue (IMDB-style prompts)
        rows = [(i, " ".join(t.split()[:spec.prefix_words])) for i, t in rows]
    return rows


def split_prompts(spec: PromptsConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """The shuffled table cut into consecutive blocks: `skip` rows left out, the `n` evaluated rows,
    then the guide prompts (the rest, in order: held-out first, then training; ivg/train/layout.py)."""
    rows = read_prompt_table(spec, "experiment.prompts")
    n = spec.n if spec.n is not None else len(rows) - spec.skip
    check(spec.skip + n <= len(rows), "experiment.prompts.n", f"skip + n = {spec.skip + n} > {len(rows)} prompts")
    return rows[spec.skip:spec.skip + n], [t for _, t in rows[spec.skip + n:]]


def make_prompts(spec: PromptsConfig, out: Path) -> tuple[Path, list[str], list[str]]:
    """Evaluation prompts (a JSONL with id, prompt), their texts, and the guide prompts after them."""
    evaluated, guide_prompts = split_prompts(spec)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i, text in evaluated:
            f.write(json.dumps({"id": i, "prompt": text}) + "\n")
    return prompts, [t for _, t in evaluated], guide_prompts


def ensure_gold(spec: GoldSpec, log) -> GoldSpec:
    """The offline sentiment gold model is trained once into the cache; others load as they are."""
    if spec.kind == "offline_sentiment":
        start = time.perf_counter()
        folder = ensure_offline_sentiment(offline_dir(spec.name))
        report = json.loads((folder / "gold_report.json").read_text())
        log(f"[gold] {folder}: held-out accuracy {report['accuracy']:.3f} (VADER {report['vader_accuracy']:.3f}), "
            f"ready in {time.perf_counter() - start:.0f}s")
    return spec


def prepare(data: dict, out: Path, log) -> Config:
    """Everything before generation: validate all sections, fetch assets, build the gold model, cut the
    prompts, train the guides, fit the probe; returns the generate config with the trained models."""
    planned = from_dict(Config, data, "config")  # every section checked before anything runs
    experiment, train = planned.experiment, planned.train
    check(experiment is not None, "experiment", "jobs.run needs an experiment: section (prompts, assets)")
    gold = planned.eval.gold if planned.eval else None
    check(gold is not None or train is None or train.gold is not None, "eval.gold",
          "the main job needs a gold model to evaluate and to label guide training")

    log(f"[assets] {', '.join(experiment.assets) or 'none needed'}")
    fetch(list(experiment.assets), progress=lambda m: log(f"[assets] {m}"))
    if gold is not None:
        ensure_gold(gold, log)
    prompts, evaluated, guide_prompts = make_prompts(experiment.prompts, out)
    log(f"[prompts] {prompts} ({len(evaluated)} evaluation, {len(guide_prompts)} after them for the guides)")
    models = dict(data["models"])
    if train is not None:
        from ivg.train.guides import train_guides  # lazy: trl and peft load only when training

        label_with = train.gold or gold
        paths = train_guides(train, guide_prompts, GoldScorer(label_with).score, label_with, evaluated, log=log)
        models.update({role: dataclasses.asdict(spec) for role, spec in paths.models().items()})
    if experiment.explicit_probe is not None:
        from ivg.train.probe import ensure_probe

        models["explicit"] = dataclasses.asdict(ensure_probe(experiment.explicit_probe, log))
    data = {**data, "models": models, "data": {**(data.get("data") or {}), "path": str(prompts)},
            "run": {**(data.get("run") or {}), "output": str(out)}}
    return from_dict(Config, data, "config")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT, help=f"experiment config (default: {DEFAULT})")
    p.add_argument("--output", help="run directory (default: runs/<run.name>)")
    p.add_argument("--num-cpus", type=float, help="CPUs of the embedded Ray (default: all)")
    args = p.parse_args(argv)
    log = functools.partial(print, flush=True)
    start = time.perf_counter()
    try:
        data = read_yaml(args.config)
        out = Path(args.output or f"runs/{(data.get('run') or {}).get('name', 'run')}")
        config = prepare(data, out, log)
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
    summary = evaluate_run(out, config.eval)
    log("\n" + markdown_table(summary))
    log(f"\n[done] {time.perf_counter() - start:.0f}s  summary: {out / 'summary.parquet'}  report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
