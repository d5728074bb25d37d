"""report.md (the summary as a Markdown table) and report.png (gold reward vs model-token cost, per method)."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def write_report(summary: pd.DataFrame, md_path: Path, png_path: Path, title: str):
    has_plot = {"gold_mean", "model_tokens_total"} <= set(summary.columns)
    lines = [f"# {title}", "", markdown_table(summary), ""]
    if "ci" in summary.columns:
        lines.append("Gold reward: mean over ok rows, 95% Student-t confidence interval [gold_ci_low, gold_ci_high].")
    if "length_controlled_winrate" in summary.columns:
        lines.append("AlpacaEval: length-controlled win rate ± standard error and raw win rate (percent), "
                     "alpaca_eval's GLM `length_controlled_v1`.")
    if has_plot:
        plot(summary, png_path)
        lines += ["", f"![gold reward vs model-token cost]({Path(png_path).name})"]
    Path(md_path).write_text("\n".join(lines) + "\n")


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def plot(summary: pd.DataFrame, path: Path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for _, s in summary.iterrows():
        err = [[s["gold_mean"] - s["gold_ci_low"]], [s["gold_ci_high"] - s["gold_mean"]]]
        ax.errorbar(s["model_tokens_total"], s["gold_mean"], yerr=err, fmt="o", capsize=4, label=s["method"])
    ax.set_xlabel("model tokens per sample (all roles)")
    ax.set_ylabel("gold reward (mean, 95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
