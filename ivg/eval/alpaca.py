"""AlpacaEval 2.0: pairwise preferences against reference outputs, and the length-controlled win rate.

alpaca_eval's annotation convention (alpaca_eval.metrics.winrate.get_winrate): `output_1` is the baseline
(`generator_1`, here the reference), `output_2` the model under test (`generator_2`); `preference` is in
[1, 2]: 1 = the reference wins, 2 = the model wins, 1.5 (or 0) a draw; weighted annotators give the
probability in between, i.e. preference = 1 + P(model beats reference).

Judges:
- offline: a local reward model r, preference = 1 + sigmoid(r(model) - r(reference)) (Bradley-Terry).
- alpaca_eval's own annotators (e.g. `weighted_alpaca_eval_gpt4_turbo`): needs an API key and network.

The LC win rate is alpaca_eval's GLM `length_controlled_v1`, fitted with alpaca_eval's own pieces: its
formula and regularisation (`GLM_INFO`), design matrices (`make_dmatrix_for_model`), cross-validated
logistic fit (`fit_LogisticRegressionCV`) and raw win rate (`get_winrate`). Only the GLM's inputs are
read here: alpaca_eval's `get_length_controlled_winrate` would download `df_gamed.csv` from the hub
dataset `tatsu-lab/alpaca_eval` inside the call, so we resolve it first — from an explicit `glm_inputs`
folder, else the HF cache, else (online only) one download — and offline fail at once with a clear
error. The features are the GLM's published ones: instruction difficulty (looked up by the AlpacaEval
instruction position 0..804, which rows carry as the DataFrame index), tanh of the standardised length
difference, and whether the row is one of the two "gamed" baselines the fit is regularised towards.
The tests check the result against the published leaderboard numbers.
"""

import gzip
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

GLM_FILES = ("df_gamed.csv", "instruction_difficulty.csv")
GLM_REPO = "tatsu-lab/alpaca_eval"
METRIC_KEYS = ("length_controlled_winrate", "lc_standard_error", "win_rate", "standard_error")


class GlmInputsMissing(FileNotFoundError):
    pass


def offline_annotations(
    instructions: list[str], outputs: list[str], references: list[str],
    output_rewards: list[float], reference_rewards: list[float], index: list[int],
    generator: str, reference_generator: str = "reference", annotator: str = "offline_reward_model",
) -> pd.DataFrame:
    """Annotations in alpaca_eval's format from reward-model scores; the DataFrame index is `index`."""
    n = len(instructions)
    for name, seq in (("outputs", outputs), ("references", references), ("output_rewards", output_rewards),
                      ("reference_rewards", reference_rewards), ("index", index)):
        if len(seq) != n:
            raise ValueError(f"offline_annotations: {len(seq)} {name} for {n} instructions")
    delta = np.asarray(output_rewards, dtype=float) - np.asarray(reference_rewards, dtype=float)
    if not np.isfinite(delta).all():
        raise ValueError(f"offline_annotations: non-finite reward at row {int(np.flatnonzero(~np.isfinite(delta))[0])}")
    return pd.DataFrame(
        {
            "instruction": instructions,
            "output_1": references,
            "generator_1": reference_generator,
            "output_2": outputs,
            "generator_2": generator,
            "annotator": annotator,
            "preference": 1.0 + 1.0 / (1.0 + np.exp(-delta)),
        },
        index=pd.Index(index),
    )


def api_annotations(
    instructions: list[str], outputs: list[str], references: list[str], index: list[int],
    generator: str, reference_generator: str = "reference", annotators_config: str = "weighted_alpaca_eval_gpt4_turbo",
) -> pd.DataFrame:
    """Annotations by one of alpaca_eval's own (API) annotators. Needs OPENAI_API_KEY and network."""
    if not os.environ.get("OPENAI_API_KEY"):
        raise RuntimeError(f"judge {annotators_config!r} calls the OpenAI API: set OPENAI_API_KEY (or use judge='offline')")
    from alpaca_eval.annotators import PairwiseAnnotator

    ref = [{"instruction": i, "output": o, "generator": reference_generator} for i, o in zip(instructions, references)]
    out = [{"instruction": i, "output": o, "generator": generator} for i, o in zip(instructions, outputs)]
    annotated = pd.DataFrame(
        PairwiseAnnotator(annotators_config=annotators_config).annotate_head2head(outputs_1=ref, outputs_2=out)
    )
    annotated.index = pd.Index(annotated["instruction"].map(dict(zip(instructions, index))))  # it merges on instruction
    return annotated


def load_annotations(path) -> pd.DataFrame:
    """An alpaca_eval annotations.json (plain or .gz), rows kept in file order (= instruction index)."""
    path = Path(path)
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        rows = json.load(f)
    df = pd.DataFrame(rows)
    missing = {"output_1", "output_2", "generator_1", "generator_2", "preference"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not alpaca_eval annotations, missing {sorted(missing)}")
    return df


def glm_input_paths(glm_inputs=None) -> dict[str, str]:
    """filename -> local path of the GLM inputs: the explicit folder, else the HF cache, else one download."""
    if glm_inputs is not None:
        paths = {f: Path(glm_inputs) / f for f in GLM_FILES}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise GlmInputsMissing(f"glm_inputs={glm_inputs}: missing {missing} (need {GLM_FILES})")
        return {f: str(p) for f, p in paths.items()}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import ENDPOINT, HF_HUB_OFFLINE

    out = {}
    for f in GLM_FILES:
        try:  # the cache first: never a network call when the files are there
            out[f] = hf_hub_download(GLM_REPO, f, repo_type="dataset", local_files_only=True)
            continue
        except Exception:
            if HF_HUB_OFFLINE:
                raise GlmInputsMissing(_missing_message(f, "HF_HUB_OFFLINE=1 and it is not in the HF cache")) from None
        if not hub_reachable():  # hf_hub_download would retry for ~25 s before giving up
            raise GlmInputsMissing(_missing_message(f, f"not in the HF cache and {ENDPOINT} is unreachable"))
        try:
            out[f] = hf_hub_download(GLM_REPO, f, repo_type="dataset", etag_timeout=10)
        except Exception as e:
            raise GlmInputsMissing(_missing_message(f, f"download failed: {type(e).__name__}: {e}")) from None
    return out


def hub_reachable(timeout: float = 5.0) -> bool:
    from huggingface_hub.constants import ENDPOINT

    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _missing_message(filename: str, why: str) -> str:
    return (
        f"alpaca_eval's LC GLM needs {filename} from the hub dataset {GLM_REPO} ({why}). Pass glm_inputs=DIR "
        f"(--glm-inputs) holding {' and '.join(GLM_FILES)}, or put them in the HF cache."
    )


def length_controlled_winrate(annotations: pd.DataFrame, glm_inputs=None, glm_name: str = "length_controlled_v1") -> dict:
    """alpaca_eval's LC win rate, its standard error and the raw win rate (percent), plus n."""
    from alpaca_eval.metrics import get_winrate
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV

    info = GLM_INFO[glm_name]
    metrics = get_winrate(annotations)
    if annotations["generator_1"].nunique() != 1 or annotations["generator_2"].nunique() != 1:
        raise ValueError("length_controlled_winrate: one model against one baseline per call")
    if annotations["generator_1"].iloc[0] == annotations["generator_2"].iloc[0]:  # a model against itself
        predicted = pd.Series(0.5, index=range(len(annotations)))
    else:
        train, test, weights = _glm_design(annotations, info, glm_input_paths(glm_inputs)["df_gamed.csv"])
        keep = train["preference"].notna()
        fit = fit_LogisticRegressionCV(train[keep], "preference", is_ytrue_proba=True,
                                       sample_weight=None if weights is None else weights[keep], **info["kwargs"])
        predicted = pd.Series(fit.predict_proba(test)[:, 1])  # P(model wins) with no length difference
    metrics["length_controlled_winrate"] = predicted.mean() * 100
    metrics["lc_standard_error"] = predicted.sem() * 100
    return {**{k: float(metrics[k]) for k in METRIC_KEYS}, "n": int(metrics["n_total"])}


def _glm_design(annotations: pd.DataFrame, info: dict, df_gamed_csv: str):
    """(train design + preference, test design, sample weights) of the LC GLM for these annotations."""
    from alpaca_eval.metrics.glm_winrate import make_dmatrix_for_model

    gamed = pd.read_csv(df_gamed_csv).drop(columns=["model"])  # the gamed baselines' rows, already featurised
    difficulty = gamed.drop_duplicates("index")["instruction_difficulty"]  # by instruction position
    rows = annotations.reset_index()
    delta = rows["output_1"].str.len() - rows["output_2"].str.len()
    own = pd.DataFrame({
        "preference": rows["preference"].astype(float).replace({0.0: 1.5}) - 1,  # [1, 2] -> [0, 1]; 0 = a draw
        "index": rows["index"],
        "std_delta_len": delta / delta.std(),
        "instruction_difficulty": rows["index"].map(lambda i: difficulty[i]),
        "not_gamed_baseline": True,
    })
    test = own[["instruction_difficulty", "not_gamed_baseline"]].assign(std_delta_len=0.0)
    lam = info["regularize_to_baseline_lambda"]
    if not lam:
        train, test = make_dmatrix_for_model(own, test, formula=info["formula"])
        return train, test, None
    both = pd.concat([gamed, own], axis=0)
    train, test = make_dmatrix_for_model(both, test, formula=info["formula"])
    # the model's own rows weigh 1; the two gamed baselines share lam between them
    weights = both["not_gamed_baseline"].astype(float) + (lam * ~both["not_gamed_baseline"]).astype(float) / 2
    return train, test, weights
