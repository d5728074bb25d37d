"""Judging generated text: gold reward models, AlpacaEval preferences and LC win rates, summaries and
reports. Needs the `eval` extra (alpaca-eval, scikit-learn, scipy, pandas, matplotlib, vaderSentiment).

  config.py   GoldSpec, AlpacaConfig, EvalConfig: the `eval:` section
  gold.py     GoldScorer (HF classifiers, scalar RMs, the offline sentiment model, VADER) and its identity
  alpaca.py   annotations in alpaca_eval's format and its length-controlled GLM
  summary.py  one row per method: means, intervals, tokens, wall time
  report.py   report.md and report.png
"""
