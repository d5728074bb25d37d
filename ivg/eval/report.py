"""report.md (the summary as a Markdown table) and report.png (gold reward against model-token cost and
against wall time, one point per method labelled with its W,K,L)."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def write_report(summary: pd.DataFrame, md_path: Path, png_path: Path, run: str, gold: str | None = None):
    title = f"{run}: gold reward ({gold})" if gold else f"Evaluation of {run}"
    has_plot = {"gold_mean", "model_tokens_total"} <= set(summary.columns)
    lines = [f"# {title}", "", markdown_table(summary), ""]
    if "ci" in summary.columns:
        lines.append(f"Gold reward ({gold}): mean over ok rows, 95% Student-t confidence interval "
                     "[gold_ci_low, gold_ci_high]; gold_scorer identifies the model and settings that scored it.")
    if "length_controlled_winrate" in summary.columns:
        lines.append("AlpacaEval: length-controlled win rate ± standard error and raw win rate (percent), "
                     "alpaca_eval's GLM `length_controlled_v1`.")
    if has_plot:
        fig = figure(summary, title)
        fig.savefig(png_path, dpi=120)
        plt.close(fig)
        lines += ["", f"![gold reward vs model tokens and wall time]({Path(png_path).name})"]
    Path(md_path).write_text("\n".join(lines) + "\n")


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v):
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def shape_label(s: pd.Series) -> str:
    """'ivg 2,2,6': the method with its W,K,L (L '–' for whole responses)."""
    if "W" not in s:
        return str(s["method"])
    L = "–" if pd.isna(s.get("L")) else int(s["L"])
    return f"{s['method']} {int(s['W'])},{int(s['K'])},{L}"


def figure(summary: pd.DataFrame, title: str):
    """Gold reward (mean, 95% CI) per method against model tokens per prompt and, where the rows have
    wall times, against decode wall seconds per prompt; the legend names each method with its W,K,L."""
    walls = "wall_s" in summary.columns and summary["wall_s"].notna().any()
    fig, axes = plt.subplots(1, 2 if walls else 1, figsize=(11 if walls else 6, 4.2), sharey=True, squeeze=False)
    panels = [("model_tokens_total", "model tokens per prompt (all roles)")]
    if walls:
        panels.append(("wall_per_prompt", "decode wall seconds per prompt"))
    data = summary.assign(wall_per_prompt=summary["wall_s"] / summary["n_ok"]) if walls else summary
    for ax, (x, label) in zip(axes[0], panels):
        for k, (_, s) in enumerate(data.iterrows()):
            err = [[s["gold_mean"] - s["gold_ci_low"]], [s["gold_ci_high"] - s["gold_mean"]]]
            ax.errorbar(s[x], s["gold_mean"], yerr=err, fmt="o", capsize=4, color=f"C{k % 10}", label=shape_label(s))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold reward, mean and 95% CI")
    ncol = 3
    rows = -(-len(data) // ncol)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, title="method W,K,L", title_fontsize=8)
    fig.suptitle(title)
    fig.set_figheight(4.2 + 0.25 * rows)
    fig.tight_layout(rect=(0, min(0.45, 0.06 + 0.055 * rows), 1, 1))
    return fig
