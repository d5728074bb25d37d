"""Evaluate a finished generate run, or recompute AlpacaEval LC from existing annotations.

  ivg evaluate --run DIR                                  # the eval: section of DIR/config.yaml
  ivg evaluate --run DIR --config jobs/configs/summarization.yaml eval.gold.device=cuda
  ivg evaluate --run DIR eval.gold.kind=vader eval.gold.name=vader
  ivg evaluate --alpaca-annotations annotations.json[.gz] [--glm-inputs DIR] [--output FILE.parquet]

Run mode judges with the `eval:` section of --config (a full config, or a file that is only an eval
section), else the one the run was generated with (DIR/config.yaml), else the offline sentiment gold
model; `eval.*` overrides apply on top. It writes DIR/evaluated/samples.parquet, DIR/summary.parquet,
DIR/report.md and report.png (layout and columns: README.md, "Outputs"); a rerun rescores only rows
whose response or scorer changed. The last line printed is one JSON object: the summary rows (run
mode) or the metrics (annotations mode).
"""

import json
import sys
from pathlib import Path

from jobs import cli

DEFAULT = {"gold": {"name": "auto", "kind": "offline_sentiment"}}


def parser(prog: str):
    p = cli.parser(prog, __doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run", metavar="DIR", help="a generate run directory (with shards/)")
    mode.add_argument("--alpaca-annotations", metavar="FILE", help="alpaca_eval annotations.json (plain or .gz)")
    p.add_argument("--config", metavar="FILE", help="YAML with an eval: section (default: DIR/config.yaml's, "
                   "else the offline sentiment gold model)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override eval fields, typed like YAML: "
                   "eval.gold.name=vader eval.gold.kind=vader")
    p.add_argument("--glm-inputs", metavar="DIR", help="folder with df_gamed.csv and instruction_difficulty.csv "
                   "(default: the HF cache)")
    p.add_argument("--output", metavar="FILE", help="Parquet file for the metrics (annotations mode)")
    p.add_argument("--print-config", action="store_true", help="print the resolved eval config (YAML) and exit")
    p.add_argument("--dry-run", action="store_true", help="check the config and the run's shards, score nothing")
    return p


def main(argv=None, prog: str = "python -m jobs.evaluate") -> int:
    args = parser(prog).parse_intermixed_args(argv)
    return cli.guarded(args, lambda: run(args))


def run(args) -> int:
    cli.setup_logging()
    if args.alpaca_annotations:
        import pandas as pd

        from ivg.eval.alpaca import length_controlled_winrate, load_annotations

        metrics = length_controlled_winrate(load_annotations(args.alpaca_annotations), args.glm_inputs)
        if args.output:
            pd.DataFrame([metrics]).to_parquet(args.output, index=False)
        print(json.dumps(metrics))
        return 0

    cfg = eval_config(args)
    if args.print_config:
        from dataclasses import asdict

        cli.print_config({"eval": json.loads(json.dumps(asdict(cfg)))})
        return 0
    from pipeline.evaluate import evaluate_run, read_shards

    if args.dry_run:
        rows = read_shards(Path(args.run)).select(["method", "status"]).to_pandas()
        print(f"[check] {args.run}: {len(rows)} rows ({int((rows['status'] == 'failed').sum())} failed), "
              f"methods {sorted(rows['method'].unique())}; gold {cfg.gold.name if cfg.gold else None}", file=sys.stderr)
        return 0
    summary = evaluate_run(args.run, cfg)
    print(summary.to_json(orient="records"))  # NaN and NA as null
    return 0


def eval_config(args):
    """The EvalConfig of run mode: --config's eval section, else the run's own, else DEFAULT; then the
    eval.* overrides, loaded like the file (from_dict)."""
    from ivg.config import ConfigError, from_dict
    from ivg.eval.config import EvalConfig
    from pipeline.config import read_yaml

    pairs = [cli.parse_override(text) for text in args.overrides]
    for key, _, text in pairs:
        if not key.startswith("eval."):
            raise ConfigError(f"{text}: ivg evaluate reads only the eval: section (e.g. eval.gold.name=vader)")
    own = Path(args.run) / "config.yaml"
    if args.config:
        data = read_yaml(args.config)
        data = data if "eval" in data else {"eval": data}  # a file that is only an eval section
    elif own.is_file() and (read_yaml(own).get("eval") or None) is not None:
        data = {"eval": read_yaml(own)["eval"]}
        print(f"[evaluate] eval config: {own}", file=sys.stderr)
    else:
        data = {"eval": DEFAULT}
    if args.glm_inputs:
        pairs.append(("eval.alpaca.glm_inputs", args.glm_inputs, "--glm-inputs"))
        if not (data.get("eval") or {}).get("alpaca"):
            raise ConfigError("--glm-inputs: the eval config has no alpaca: section to use it")
    data = cli.apply_overrides(data, pairs)
    return from_dict(EvalConfig, data.get("eval"), "eval")


if __name__ == "__main__":
    sys.exit(main())
