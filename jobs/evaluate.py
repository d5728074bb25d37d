"""Evaluate a finished generate run, or recompute AlpacaEval LC from existing annotations.

    python -m jobs.evaluate --run DIR [--config CONFIG.yaml]
    python -m jobs.evaluate --alpaca-annotations annotations.json[.gz] [--glm-inputs DIR] [--out FILE.parquet]

The last line printed is one JSON object: the metrics (annotations mode) or the summary rows (run mode).
--config takes a YAML file whose `eval:` section (or the whole file) is an EvalConfig; without it, a run is
judged by the offline sentiment gold model. The run dir layout is in pipeline/evaluate.py.
"""

import argparse
import dataclasses
import json
import logging
import math
import sys

import pandas as pd

from ivg.config import ConfigError, from_dict
from ivg.eval.alpaca import length_controlled_winrate, load_annotations
from ivg.eval.config import EvalConfig
from pipeline.config import read_yaml
from pipeline.evaluate import evaluate_run

DEFAULT = {"gold": {"name": "auto", "kind": "offline_sentiment"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run", help="generate run dir (with shards/)")
    mode.add_argument("--alpaca-annotations", help="alpaca_eval annotations.json (plain or .gz)")
    ap.add_argument("--config", help="YAML with an eval: section (run mode)")
    ap.add_argument("--glm-inputs", help="folder with df_gamed.csv, instruction_difficulty.csv (else the HF cache)")
    ap.add_argument("--out", help="Parquet file for the metrics (annotations mode)")
    ap.add_argument("--partial", action="store_true",
                    help="evaluate a run whose generation is unfinished; every summary row says partial")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    if args.alpaca_annotations:
        metrics = length_controlled_winrate(load_annotations(args.alpaca_annotations), args.glm_inputs)
        if args.out:
            pd.DataFrame([metrics]).to_parquet(args.out, index=False)
        print(json.dumps(metrics))
        return metrics

    try:
        raw = DEFAULT
        if args.config:
            raw = read_yaml(args.config)
            raw = raw.get("eval", raw)
        cfg = from_dict(EvalConfig, raw, "eval")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.glm_inputs and cfg.alpaca:
        cfg = dataclasses.replace(cfg, alpaca=dataclasses.replace(cfg.alpaca, glm_inputs=args.glm_inputs))
    summary = evaluate_run(args.run, cfg, partial=args.partial)
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in summary.to_dict(orient="records")]
    print(json.dumps(rows, default=str))
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
