"""The main job, an experiment end to end: assets, gold model, prompts, guides, generate, evaluate.

  ivg run                                                  # jobs/configs/sentiment-default.yaml
  ivg run --config jobs/configs/weak-to-strong.yaml --output runs/w2s
  ivg run --limit 8 decode.max_new_tokens=8 --output runs/quick    # a quick look
  ivg run --dry-run                                        # check config, prompts and output; train nothing

    assets -> gold model -> prompts -> guides (trained, or reused from the cache) -> generate every
    method on Ray -> evaluate -> summary table, summary.parquet and report.md under runs/<name>/

The config is a generate config (pipeline/config.py) whose `experiment:` section says which assets to
fetch, where prompts come from and (optionally) which reward probe becomes models.explicit, and whose
`train:` section trains the guides (ivg/train/) on the prompts after the evaluated ones: the trained
folders become models.tuned/untuned and models.explicit (the token reward model, unless
`train.token_rm: null` or a probe is asked for), wherever `models:` leaves them empty. The resolved
config written with the run records every section, so a run says how its guides and probe were made.
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
        spec = experiment.prompts
        evaluated, guide_prompts = split_prompts(spec)
        print(f"[check] {spec.path}: {spec.skip + len(evaluated) + len(guide_prompts)} usable rows: {spec.skip} "
              f"skipped, {len(evaluated)} evaluated, {len(guide_prompts)} after them for the guides", file=sys.stderr)
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


def split_prompts(spec) -> tuple[list[tuple[str, str]], list[str]]:
    """The shuffled table cut into consecutive blocks: `skip` rows left out, the `n` evaluated (id, text)
    rows, then the guide prompts (the rest, in order: held-out first, then training; ivg/train/layout.py)."""
    from ivg.config import check as require

    rows = read_prompt_table(spec, "experiment.prompts")
    n = spec.n if spec.n is not None else len(rows) - spec.skip
    require(spec.skip + n <= len(rows), "experiment.prompts.n", f"skip + n = {spec.skip + n} > {len(rows)} prompts")
    return rows[spec.skip:spec.skip + n], [t for _, t in rows[spec.skip + n:]]


def make_prompts(spec, out: Path) -> tuple[Path, list[str], list[str]]:
    """Evaluation prompts (a JSONL with id, prompt), their texts, and the guide prompts after them."""
    evaluated, guide_prompts = split_prompts(spec)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i, text in evaluated:
            f.write(json.dumps({"id": i, "prompt": text}) + "\n")
    return prompts, [t for _, t in evaluated], guide_prompts


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
    prompts, evaluated, guide_prompts = make_prompts(experiment.prompts, out)
    log(f"[prompts] {prompts} ({len(evaluated)} evaluation, {len(guide_prompts)} after them for the guides)", flush=True)
    models = dict(data["models"])
    if train is not None:
        from ivg.train.guides import train_guides  # lazy: scikit-learn loads only when training

        start = time.perf_counter()
        log("[guides] training unless cached", flush=True)
        label_with = train.gold or gold
        paths = train_guides(train, guide_prompts, GoldScorer(label_with).score, label_with, evaluated,
                             log=lambda m: log(f"[guides] {m}", flush=True))
        log(f"[guides] ready in {time.perf_counter() - start:.0f}s", flush=True)
        # the trained guides fill the roles the config leaves empty (as Config.planned_models says)
        models.update({role: dataclasses.asdict(spec) for role, spec in paths.models().items()
                       if data["models"].get(role) is None})
    if experiment.explicit_probe is not None and data["models"].get("explicit") is None:
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
