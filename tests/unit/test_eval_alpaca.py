import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from alpaca_eval.metrics import get_winrate

from helpers import eval_fakes
from ivg.eval.alpaca import GlmInputsMissing, length_controlled_winrate, load_annotations, offline_annotations

SHARED = Path("/work/shared/alpaca_eval")
ROOT = Path(__file__).resolve().parents[2]


def test_offline_preference_direction():
    # output_2 is the model; alpaca_eval counts preference 2 as a model win
    ann = offline_annotations(["q1", "q2"], ["good", "bad"], ["ref", "ref"], [3.0, -1.0], [0.0, 0.0], [0, 1], "m")
    np.testing.assert_allclose(ann["preference"], [1 + 1 / (1 + np.exp(-3)), 1 + 1 / (1 + np.exp(1))])
    assert list(ann.index) == [0, 1] and (ann["generator_2"] == "m").all()
    assert get_winrate(ann)["n_wins"] == 1 and get_winrate(ann)["n_wins_base"] == 1


def test_offline_annotations_reject_bad_input():
    with pytest.raises(ValueError, match="1 outputs for 2 instructions"):
        offline_annotations(["a", "b"], ["x"], ["r", "r"], [0, 0], [0, 0], [0, 1], "m")
    with pytest.raises(ValueError, match="non-finite reward at row 1"):
        offline_annotations(["a", "b"], ["x", "y"], ["r", "r"], [0, np.nan], [0, 0], [0, 1], "m")


def test_offline_judge_to_lc(tmp_path):
    glm = eval_fakes.glm_inputs(tmp_path / "glm", n=40)
    rng = np.random.default_rng(0)
    outputs = ["word " * int(k) for k in rng.integers(5, 60, 40)]
    references = ["word " * 30] * 40
    # a judge that likes length: the raw win rate is inflated, the LC rate corrects toward 50
    r_out = [len(o) / 50 + rng.normal(0, 0.3) for o in outputs]
    ann = offline_annotations([f"q{i}" for i in range(40)], outputs, references, r_out, [len(references[0]) / 50] * 40,
                              list(range(40)), "m")
    m = length_controlled_winrate(ann, glm)
    assert set(m) == {"length_controlled_winrate", "lc_standard_error", "win_rate", "standard_error", "n"}
    assert m["n"] == 40 and 0 < m["length_controlled_winrate"] < 100 and m["lc_standard_error"] > 0
    assert m["win_rate"] == pytest.approx((ann["preference"].mean() - 1) * 100)


def test_missing_glm_inputs_fail_fast(tmp_path):
    ann = offline_annotations(["q"], ["a"], ["b"], [1.0], [0.0], [0], "m")
    with pytest.raises(GlmInputsMissing, match="df_gamed.csv"):
        length_controlled_winrate(ann, tmp_path)
    script = "from ivg.eval.alpaca import glm_input_paths\nglm_input_paths()"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    t = time.time()
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode != 0 and "HF_HUB_OFFLINE=1 and it is not in the HF cache" in p.stderr
    assert time.time() - t < 30  # no retry loop


def test_load_annotations_names_missing_columns(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x", "preference": 1.0}]))
    with pytest.raises(ValueError, match="missing.*output_1"):
        load_annotations(tmp_path / "a.json")


# ------------------------------------------------------------------------------------------------------------
# Reproduce alpaca_eval's numbers from real annotations (data beside the checkout, tests only).

needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} not present")


def expected_models():
    if not SHARED.exists():
        return []
    exp = pd.read_csv(SHARED / "expected.csv")
    board = pd.read_csv(SHARED / "leaderboard.csv", index_col=0)
    return [(r.model, r.reference_lc, r.reference_win_rate, board.loc[r.model, "win_rate"]) for r in exp.itertuples()]


@needs_shared
@pytest.mark.parametrize("model, lc, wr, board_wr", expected_models())
def test_reproduce_lc_function(model, lc, wr, board_wr):
    m = length_controlled_winrate(load_annotations(SHARED / "models" / model / "annotations.json.gz"), SHARED / "glm")
    assert abs(m["win_rate"] - board_wr) < 1e-6  # the leaderboard's full-precision raw win rate
    assert round(m["win_rate"], 3) == pytest.approx(wr, abs=1e-9)  # expected.csv holds it rounded to 3 decimals
    assert abs(m["length_controlled_winrate"] - lc) < 0.05
    assert m["n"] == 805


@needs_shared
@pytest.mark.slow
def test_reproduce_lc_cli(tmp_path):
    for model, lc, wr, board_wr in expected_models():
        out = tmp_path / f"{model}.parquet"
        p = subprocess.run(
            [sys.executable, "-m", "jobs.evaluate", "--alpaca-annotations",
             str(SHARED / "models" / model / "annotations.json.gz"), "--glm-inputs", str(SHARED / "glm"), "--output", str(out)],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )
        assert p.returncode == 0, p.stderr
        m = json.loads(p.stdout.strip().splitlines()[-1])
        assert abs(m["win_rate"] - board_wr) < 1e-6 and abs(m["length_controlled_winrate"] - lc) < 0.05
        assert {"lc_standard_error", "standard_error", "n"} <= set(m)
        assert pd.read_parquet(out).iloc[0].to_dict() == pytest.approx(m)
