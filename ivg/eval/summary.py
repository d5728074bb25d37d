"""One row per method: its cell and search shape, gold reward means with Student-t intervals, LC win
rates, tokens and wall time. The columns are listed in README.md, "Outputs"."""

import numpy as np
import pandas as pd
from scipy import stats

SHAPE = ("token", "chunk", "W", "K", "L", "beta_token", "beta_chunk")  # constant within a method


def summarize(rows: pd.DataFrame, lc: dict | None = None, level: float = 0.95, gold: str | None = None) -> pd.DataFrame:
    """One row per method. Means are over ok rows; the gold CI is a Student-t interval on the mean.
    `gold` names the gold model in the table (the rows' gold_reward_scorer says exactly which)."""
    out = []
    for method, g in rows.groupby("method", sort=True):
        ok = g[g["status"] == "ok"]
        s = {"method": method, **shape(g)}
        s.update({"n": len(g), "n_ok": len(ok), "n_failed": len(g) - len(ok)})
        if "gold_reward" in g.columns:
            s["gold_mean"], s["gold_ci_low"], s["gold_ci_high"] = t_interval(ok["gold_reward"].to_numpy(float), level)
            s["ci"] = f"t{int(level * 100)}"
            s["gold_model"] = gold
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
    df = pd.DataFrame(out)
    # a role's token column wherever a method first has it: all of them together, before the total
    roles = sorted(c for c in df.columns if c.startswith("model_tokens_") and c != "model_tokens_total")
    if roles:
        rest = [c for c in df.columns if c not in roles]
        at = rest.index("model_tokens_total")
        df = df[rest[:at] + roles + rest[at:]]
    for k in ("W", "K", "L"):  # integers, null where a method has none (L of Best-of-N)
        if k in df.columns:
            df[k] = df[k].astype("Int64")
    return df


def shape(g: pd.DataFrame) -> dict:
    """A method's cell and search shape from its rows; a beta whose guidance is off is null, not 1."""
    first = {k: g[k].iloc[0] for k in SHAPE if k in g.columns}
    if not first:
        return {}
    token, chunk = first.get("token", "none"), first.get("chunk", "none")
    cell = " + ".join([f"{token} token-wise"] * (token != "none") + [f"{chunk} chunk-level"] * (chunk != "none"))
    out = {"cell": cell or "sampling", **first}
    for beta, guidance in (("beta_token", token), ("beta_chunk", chunk)):
        if beta in out and guidance == "none":
            out[beta] = None
    if "L" in out and pd.isna(out["L"]):
        out["L"] = None  # whole responses (Best-of-N)
    return out


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
    """model_tokens as {role: tokens}: a dict (a Parquet map read with maps_as_pydicts, or a struct) or
    a list of (key, value) pairs (a map read plainly)."""
    if m is None:
        return {}
    return dict(m) if not isinstance(m, dict) else {k: v for k, v in m.items() if v is not None}
