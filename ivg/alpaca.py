"""AlpacaEval 2.0: pairwise preferences against reference outputs, and the length-controlled win rate.

alpaca_eval's annotation convention (alpaca_eval.metrics.winrate.get_winrate): `output_1` is the baseline
(`generator_1`, here the reference), `output_2` the model under test (`generator_2`); `preference` is in
[1, 2]: 1 = the reference wins, 2 = the model wins, 1.5 (or 0) a draw; weighted annotators give the
probability in between, i.e. preference = 1 + P(model beats reference).

Judges:
- offline: a local reward model r, preference = 1 + sigmoid(r(model) - r(reference)) (Bradley-Terry).
- alpaca_eval's own annotators (e.g. `weighted_alpaca_eval_gpt4_turbo`): needs an API key and network.

The LC win rate is alpaca_eval's own `get_length_controlled_winrate` (GLM `length_controlled_v1`). That code
downloads `df_gamed.csv` and `instruction_difficulty.csv` from the hub dataset `tatsu-lab/alpaca_eval`; we
resolve them first — from an explicit `glm_inputs` folder, else from the HF cache, else (online only) one
download — and hand alpaca_eval the local paths, so offline it fails at once with a clear error.
The GLM looks instruction difficulty up by the annotations' index (`df.reset_index()["index"]`): rows must
carry their AlpacaEval instruction position (0..804) as the DataFrame index.
"""

import gzip
import json
import os
import socket
from pathlib import Path
from unittest import mock
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
        if not _hub_reachable():  # hf_hub_download would retry for ~25 s before giving up
            raise GlmInputsMissing(_missing_message(f, f"not in the HF cache and {ENDPOINT} is unreachable"))
        try:
            out[f] = hf_hub_download(GLM_REPO, f, repo_type="dataset", etag_timeout=10)
        except Exception as e:
            raise GlmInputsMissing(_missing_message(f, f"download failed: {type(e).__name__}: {e}")) from None
    return out


def _hub_reachable(timeout: float = 5.0) -> bool:
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


def length_controlled_winrate(annotations: pd.DataFrame, glm_inputs=None) -> dict:
    """alpaca_eval's LC win rate, its standard error and the raw win rate (percent), plus n."""
    from alpaca_eval.metrics import glm_winrate

    paths = glm_input_paths(glm_inputs)

    def local_download(repo_id, filename, **kwargs):  # stands in for hf_hub_download inside alpaca_eval
        return paths[filename]

    # save_weights_dir=None: by default alpaca_eval writes the GLM weights into its own install folder.
    with mock.patch.object(glm_winrate, "hf_hub_download", local_download):
        m = glm_winrate.get_length_controlled_winrate(annotations, save_weights_dir=None, is_warn_extreme_changes=False)
    return {**{k: float(m[k]) for k in METRIC_KEYS}, "n": int(m["n_total"])}
