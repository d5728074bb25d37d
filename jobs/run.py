"""The main job, an experiment end to end: assets, gold model, prompts, guides, generate, evaluate.

  ivg run                                                  # jobs/configs/sentiment-default.yaml
  ivg run --config jobs/configs/weak-to-strong.yaml --output runs/w2s
  ivg run --limit 8 decode.max_new_tokens=8 --output runs/quick    # a quick look
  ivg run --dry-run                                        # check config, prompts and output; train nothing

    assets -> gold model -> prompts -> guides (trained, or reused from the cache) -> generate every
    method on Ray -> evaluate -> summary table, summary.parquet and report.md under runs/<name>/

The config is a generate config (pipeline/config.py) whose `experiment:` section says which assets to
fetch, where prompts come from and (optionally) which reward probe becomes models.explicit, and whose
`train:` section trains the guides (ivg/train/): the trained folders become models.tuned/untuned (and
models.explicit, a token reward model, unless the settings turn it off). The resolved config written
with the run records every section, so a run says how its guides and probe were made.
"""

import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

from jobs import cli

DEFAULT = "jobs/configs/sentiment-default.yaml"


def parser(prog: str):
    p = cli.parser(prog, __doc__)
    cli.add_config_flags(p, default=DEFAULT, what="experiment config")
    p.add_argument("--output", metavar="DIR", help="run directory (default: runs/<run.name>)")
    cli.add_run_flags(p, input=False)
    cli.add_ray_flags(p)
    return p


def main(argv=None, prog: str = "python -m jobs.run") -> int:
    args = parser(prog).parse_intermixed_args(argv)
    return cli.guarded(args, lambda: run(args))


def run(args) -> int:
    from ivg.config import from_dict
    from pipeline.config import Config

    start = time.perf_counter()
    data = cli.config_data(args, skip=("output",))
    out = Path(args.output or f"runs/{(data.get('run') or {}).get('name', 'run')}")
    planned = from_dict(Config, data, "config")  # every section checked before anything runs
    if args.print_config:
        cli.print_config(planned.resolved())
        return 0
    check(planned, out)
    if args.dry_run:
        return 0
    cli.setup_logging()
    config = prepare(data, out, print)

    from ivg.eval.report import markdown_table
    from pipeline.coordinator import generate, preflight
    from pipeline.evaluate import evaluate_run

    checked = preflight(config, local=not (args.address or os.environ.get("RAY_ADDRESS")))
    with cli.ray_session(args):
        result = generate(config, checked=checked)
    if result.status != "finished":
        print(f"[generate] {result.status}: see {out / 'manifest.json'}")
        return 1
    print("[evaluate] gold rewards, summary, report", flush=True)
    summary = evaluate_run(out, config.eval)
    print("\n" + markdown_table(summary))
    print(f"\n[done] {time.perf_counter() - start:.0f}s  summary: {out / 'summary.parquet'}  report: {out / 'report.md'}")
    return 0


def check(planned, out: Path) -> None:
    """What can be known before fetching or training: the sections, the prompt table, the output."""
    from ivg.config import check as require
    from ivg.offline.assets import ready

    experiment = planned.experiment
    require(experiment is not None, "experiment", "ivg run needs an experiment: section (prompts, assets); "
            "a config without one runs with `ivg generate`")
    gold = planned.eval.gold if planned.eval else None
    require(gold is not None or planned.train is None or planned.train.gold is not None, "eval.gold",
            "the main job needs a gold model to evaluate and to label guide training")
    require(not out.exists() or out.is_dir(), "--output", f"{out} exists and is not a directory")
    missing = [a for a in experiment.assets if not ready(a)]
    if missing:
        print(f"[check] assets to fetch first: {', '.join(missing)}", file=sys.stderr)
    else:
        rows = read_prompt_table(experiment.prompts, "experiment.prompts")
        n = evaluated(experiment.prompts, rows)
        print(f"[check] {experiment.prompts.path}: {len(rows)} usable rows: {experiment.prompts.train_n} for "
              f"training, {n} evaluated", file=sys.stderr)
    print(f"[check] {len(planned.methods)} methods -> {out}", file=sys.stderr, flush=True)


def read_prompt_table(spec, where: str) -> list[tuple[str, str]]:
    """(id, text) rows of the prompt table, shuffled with spec.seed, openings cut to spec.prefix_words.
    Read like any input (pipeline.io.read_prompts: every format, ids as text); rows whose text cannot
    be used (null, empty, not valid UTF-8) are left out."""
    from ivg.config import ConfigError
    from ivg.models import resolve_name
    from pipeline.io import InputError, batch_rows, read_prompts

    try:
        batches = read_prompts(resolve_name(spec.path), id_column=spec.id_column, prompt_column=spec.column)
        table = [r for b in batches for r in batch_rows(b)]
    except InputError as e:
        raise ConfigError(f"{where}.path: {e}") from None
    rows = [(r["id"], r["prompt"]) for r in table
            if not r["error"] and r["prompt"] and len(r["prompt"].split()) >= spec.min_words]
    random.Random(spec.seed).shuffle(rows)
    if spec.prefix_words:  # the opening words of a text, for the model to continue (IMDB-style prompts)
        rows = [(i, " ".join(t.split()[:spec.prefix_words])) for i, t in rows]
    return rows


def evaluated(spec, rows: list) -> int:
    """How many prompts are evaluated: spec.n, or all the training ones leave."""
    from ivg.config import check as require

    n = spec.n if spec.n is not None else len(rows) - spec.train_n
    require(spec.train_n + n <= len(rows), "experiment.prompts.n", f"train_n + n = {spec.train_n + n} > {len(rows)} prompts")
    return n


def make_prompts(spec, out: Path) -> tuple[Path, list[str]]:
    """Evaluation prompts (a JSONL with id, prompt) and a disjoint list of training prompts."""
    rows = read_prompt_table(spec, "experiment.prompts")
    n = evaluated(spec, rows)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i, text in rows[spec.train_n:spec.train_n + n]:
            f.write(json.dumps({"id": i, "prompt": text}) + "\n")
    return prompts, [t for _, t in rows[:spec.train_n]]


def ensure_gold(spec, log):
    """The offline sentiment gold model is trained once into the cache; others load as they are."""
    from ivg.eval.gold import ensure_offline_sentiment, offline_dir

    if spec.kind == "offline_sentiment":
        start = time.perf_counter()
        log(f"[gold] offline sentiment model ({spec.name}): building it unless cached", flush=True)
        folder = ensure_offline_sentiment(offline_dir(spec.name))
        report = json.loads((folder / "gold_report.json").read_text())
        log(f"[gold] {folder}: held-out accuracy {report['accuracy']:.3f} (VADER {report['vader_accuracy']:.3f}), "
            f"ready in {time.perf_counter() - start:.0f}s")
    return spec


def prepare(data: dict, out: Path, log):
    """Everything before generation: validate all sections, fetch assets, build the gold model, cut the
    prompts, train the guides, fit the probe; returns the generate config with the trained models."""
    from ivg.config import from_dict
    from ivg.eval.gold import GoldScorer
    from ivg.offline.assets import fetch
    from pipeline.config import Config

    planned = from_dict(Config, data, "config")
    experiment, train = planned.experiment, planned.train
    gold = planned.eval.gold if planned.eval else None

    log(f"[assets] {', '.join(experiment.assets) or 'none needed'}", flush=True)
    fetch(list(experiment.assets), progress=lambda m: log(f"[assets] {m}", flush=True))
    if gold is not None:
        ensure_gold(gold, log)
    prompts, train_prompts = make_prompts(experiment.prompts, out)
    log(f"[prompts] {prompts} ({sum(1 for _ in open(prompts))} evaluation, {len(train_prompts)} training)", flush=True)
    models = dict(data["models"])
    if train is not None:
        from ivg.train.guides import train_guides  # lazy: trl and peft load only when training

        start = time.perf_counter()
        log("[guides] training unless cached", flush=True)
        label_with = train.gold or gold
        paths = train_guides(train, train_prompts, GoldScorer(label_with).score, label_with,
                             log=lambda m: log(f"[guides] {m}", flush=True))
        log(f"[guides] ready in {time.perf_counter() - start:.0f}s", flush=True)
        models.update({role: dataclasses.asdict(spec) for role, spec in paths.models().items()})
    if experiment.explicit_probe is not None:
        from ivg.train.probe import ensure_probe

        start = time.perf_counter()
        log("[probe] fitting the explicit reward probe unless cached", flush=True)
        models["explicit"] = dataclasses.asdict(ensure_probe(experiment.explicit_probe,
                                                             lambda m: log(f"[probe] {m}", flush=True)))
        log(f"[probe] ready in {time.perf_counter() - start:.0f}s", flush=True)
    data = {**data, "models": models, "data": {**(data.get("data") or {}), "path": str(prompts)},
            "run": {**(data.get("run") or {}), "output": str(out)}}
    return from_dict(Config, data, "config")


if __name__ == "__main__":
    sys.exit(main())
