"""One row per method: gold reward means with Student-t intervals, LC win rates, tokens and wall time."""

import numpy as np
import pandas as pd
from scipy import stats


def summarize(rows: pd.DataFrame, lc: dict | None = None, level: float = 0.95) -> pd.DataFrame:
    """One row per method. Means are over ok rows; the gold CI is a Student-t interval on the mean."""
    out = []
    for method, g in rows.groupby("method", sort=True):
        ok = g[g["status"] == "ok"]
        s = {"method": method, "n": len(g), "n_ok": len(ok), "n_failed": len(g) - len(ok)}
        if "gold_reward" in g.columns:
            s["gold_mean"], s["gold_ci_low"], s["gold_ci_high"] = t_interval(ok["gold_reward"].to_numpy(float), level)
            s["ci"] = f"t{int(level * 100)}"
            if "gold_reward_scorer" in ok.columns:  # which gold model made these numbers
                s["gold_scorer"] = ",".join(sorted(set(ok["gold_reward_scorer"].dropna()))) or None
        s.update({("n_annotated" if k == "n" else k): v for k, v in (lc or {}).get(method, {}).items()})
        s["mean_new_tokens"] = ok["n_new_tokens"].mean() if "n_new_tokens" in ok.columns else np.nan
        if "model_tokens" in ok.columns:
            per_role = pd.DataFrame([as_dict(m) for m in ok["model_tokens"]], index=ok.index)
            for role in sorted(per_role.columns):
                s[f"model_tokens_{role}"] = per_role[role].mean()
            s["model_tokens_total"] = per_role.sum(axis=1).mean()
        if "wall_s" in ok.columns:
            s["wall_s"] = ok["wall_s"].sum()
            s["tokens_per_s"] = ok["n_new_tokens"].sum() / s["wall_s"] if s["wall_s"] > 0 else np.nan
        out.append(s)
    return pd.DataFrame(out)


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean ± t_{(1+level)/2, n-1} · s/√n; NaN bounds when n < 2."""
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return np.nan, np.nan, np.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, np.nan, np.nan
    half = stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return mean, mean - half, mean + half


def as_dict(m) -> dict:
    """model_tokens comes back from Parquet as a dict (struct) or a list of (key, value) pairs (map)."""
    if m is None:
        return {}
    return dict(m) if not isinstance(m, dict) else {k: v for k, v in m.items() if v is not None}


