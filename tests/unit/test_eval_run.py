import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from helpers import eval_fakes
from ivg.config import from_dict
from ivg.eval.config import GoldSpec
from ivg.eval.config import AlpacaConfig, EvalConfig
from ivg.eval.summary import summarize, t_interval
from pipeline.evaluate import evaluate_run

ROOT = Path(__file__).resolve().parents[2]


class CountingScorer:
    """A deterministic gold model that records what it was asked to score."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, responses):
        self.calls.append(list(responses))
        return [float(sum(w in eval_fakes.GOOD for w in r.split()) - sum(w in eval_fakes.BAD for w in r.split()))
                for r in responses]


def test_t_interval_matches_scipy():
    x = np.array([1.2, 3.4, 0.5, 2.2, 2.9, 1.7, 0.1])
    mean, lo, hi = t_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean()) and (lo, hi) == pytest.approx(ref, rel=1e-12)
    assert t_interval(np.array([2.0]))[0] == 2.0 and np.isnan(t_interval(np.array([2.0]))[1])


def test_summary_excludes_failed_rows():
    df = eval_fakes.generate_rows(n=6, failed=2)
    df["gold_reward"] = np.where(df["status"] == "ok", np.arange(len(df), dtype=float), np.nan)
    s = summarize(df).set_index("method")
    ok = df[(df["method"] == "base") & (df["status"] == "ok")]
    assert s.loc["base", "n"] == 6 and s.loc["base", "n_failed"] == 2 and s.loc["base", "n_ok"] == 4
    ref = stats.t.interval(0.95, 3, loc=ok["gold_reward"].mean(), scale=stats.sem(ok["gold_reward"]))
    assert (s.loc["base", "gold_ci_low"], s.loc["base", "gold_ci_high"]) == pytest.approx(ref)
    assert s.loc["base", "model_tokens_base"] == pytest.approx(ok["model_tokens"].map(lambda m: m["base"]).mean())
    assert s.loc["base", "tokens_per_s"] == pytest.approx(ok["n_new_tokens"].sum() / ok["wall_s"].sum())
    assert s.loc["base", "ci"] == "t95"


def test_evaluate_run_idempotent_with_report(tmp_path):
    run = eval_fakes.write_run(tmp_path / "run", eval_fakes.generate_rows(n=6, failed=1), shards=3)
    cfg = EvalConfig(gold=GoldSpec("fake", "vader"))
    scorer = CountingScorer()
    s1 = evaluate_run(run, cfg, scorer=scorer)
    assert sum(map(len, scorer.calls)) == 10  # 2 methods x 5 ok rows; failed rows never scored
    samples = pd.read_parquet(run / "evaluated" / "samples.parquet")
    assert len(samples) == 12 and samples["gold_reward"].isna().sum() == 2
    assert samples.loc[samples["status"] == "failed", "error"].eq("OOM at step 3").all()
    assert isinstance(samples["model_tokens"].iloc[0], dict) and len(samples["chunk_scores"].iloc[0]) == 2

    # re-run: nothing rescored, same files, no duplicated rows
    s2 = evaluate_run(run, cfg, scorer=scorer)
    assert len(scorer.calls) == 1
    pd.testing.assert_frame_equal(s1, s2)
    pd.testing.assert_frame_equal(samples, pd.read_parquet(run / "evaluated" / "samples.parquet"))

    # a new shard: only its rows are scored
    extra = eval_fakes.generate_rows(methods=("bon",), n=3, failed=0)
    extra.to_parquet(run / "shards" / "shard-00099.parquet")
    s3 = evaluate_run(run, cfg, scorer=scorer)
    assert len(scorer.calls) == 2 and len(scorer.calls[1]) == 3
    assert list(s3["method"]) == ["base", "bon", "ivg"]

    md = (run / "report.md").read_text()
    assert "| method |" in md and "bon" in md and "t95" in md and "report.png" in md
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_parquet(run / "summary.parquet").equals(s3)


def test_a_changed_gold_model_rescores_instead_of_reusing_the_old_scores(tmp_path):
    """The issue's repro: evaluate with VADER, then with another gold model. Scores are reused only
    where the scorer that made them is the configured one, so the second evaluation equals a fresh one."""
    df = eval_fakes.generate_rows(n=6, failed=1)
    run, fresh = (eval_fakes.write_run(tmp_path / name, df) for name in ("run", "fresh"))
    classifier = GoldSpec(str(eval_fakes.tiny_classifier(tmp_path / "clf")), "classifier")
    evaluate_run(run, EvalConfig(gold=GoldSpec("vader", "vader")))
    vader = pd.read_parquet(run / "evaluated" / "samples.parquet")["gold_reward"]

    second = evaluate_run(run, EvalConfig(gold=classifier))
    expected = evaluate_run(fresh, EvalConfig(gold=classifier))
    pd.testing.assert_frame_equal(second, expected)
    samples = pd.read_parquet(run / "evaluated" / "samples.parquet")
    np.testing.assert_allclose(samples["gold_reward"], pd.read_parquet(fresh / "evaluated" / "samples.parquet")["gold_reward"])
    assert not np.allclose(samples["gold_reward"].dropna(), vader.dropna())
    # every score says who made it, and eval_config.json says what that id is
    made = samples.loc[samples["status"] == "ok", "gold_reward_scorer"]
    assert made.nunique() == 1 and samples.loc[samples["status"] == "failed", "gold_reward_scorer"].isna().all()
    identity = json.loads((run / "evaluated" / "eval_config.json").read_text())["scorers"][made.iloc[0]]
    assert identity["spec"]["name"] == classifier.name and identity["spec"]["kind"] == "classifier"
    assert (second["gold_scorer"] == made.iloc[0]).all()


def test_gold_weights_retrained_in_place_or_a_new_format_rescore_but_device_does_not(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    run = eval_fakes.write_run(tmp_path / "run", eval_fakes.generate_rows(n=4, failed=0))
    folder = eval_fakes.tiny_classifier(tmp_path / "clf")
    spec = GoldSpec(str(folder), "classifier")
    scorer = CountingScorer()
    evaluate_run(run, EvalConfig(gold=spec), scorer=scorer)
    evaluate_run(run, EvalConfig(gold=GoldSpec(str(folder), "classifier", device="cpu", batch_size=3)), scorer=scorer)
    assert len(scorer.calls) == 1  # speed-only settings: the same scores

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # new weights, same file sizes
    model.save_pretrained(folder)
    evaluate_run(run, EvalConfig(gold=spec), scorer=scorer)
    assert len(scorer.calls) == 2 and len(scorer.calls[1]) == 8

    evaluate_run(run, EvalConfig(gold=GoldSpec(str(folder), "classifier", format="{response}")), scorer=scorer)
    assert len(scorer.calls) == 3 and len(scorer.calls[2]) == 8


def test_evaluate_run_rejects_duplicate_rows(tmp_path):
    df = eval_fakes.generate_rows(n=3, failed=0)
    run = eval_fakes.write_run(tmp_path / "run", pd.concat([df, df.iloc[:1]]), shards=1)
    with pytest.raises(ValueError, match="'id': 'p0', 'method': 'base'.*2 times"):
        evaluate_run(run, EvalConfig(gold=GoldSpec("v", "vader")), scorer=CountingScorer())


def test_alpaca_offline_judge_in_run(tmp_path):
    df = eval_fakes.generate_rows(n=30, failed=1, with_reference=True)
    df.loc[(df["id"] == "p5") & (df["method"] == "base"), "status"] = "failed"  # its reference is scored via ivg
    run = eval_fakes.write_run(tmp_path / "run", df)
    glm = eval_fakes.glm_inputs(tmp_path / "glm", n=30)
    cfg = EvalConfig(gold=GoldSpec("v", "vader"), alpaca=AlpacaConfig(glm_inputs=str(glm)))
    scorer = CountingScorer()
    s = evaluate_run(run, cfg, scorer=scorer).set_index("method")
    samples = pd.read_parquet(run / "evaluated" / "samples.parquet")
    ok = samples[samples["status"] == "ok"]
    expected = 1 + 1 / (1 + np.exp(-(ok["gold_reward"] - ok["reference_reward"])))
    np.testing.assert_allclose(ok["preference"], expected)
    assert (ok["judge"] == "offline_reward_model").all() and samples.loc[samples["status"] == "failed", "preference"].isna().all()
    assert s.loc["ivg", "win_rate"] == pytest.approx((ok[ok["method"] == "ivg"]["preference"].mean() - 1) * 100)
    assert {"length_controlled_winrate", "lc_standard_error"} <= set(s.columns)
    assert s.loc["base", "n"] == 30 and s.loc["base", "n_annotated"] == 28 and s.loc["ivg", "n_annotated"] == 29
    ann = json.loads((run / "evaluated" / "annotations" / "ivg.json").read_text())
    assert len(ann) == 29 and ann[0]["generator_2"] == "ivg" and ann[0]["generator_1"] == "reference"
    # references are scored once per id, not once per method
    assert sum(map(len, scorer.calls)) == 28 + 29 + 29
    assert json.loads((run / "evaluated" / "eval_config.json").read_text())["alpaca"]["glm_inputs"] == str(glm)


def test_eval_config_validation_names_field():
    with pytest.raises(ValueError, match=r"eval: unknown key\(s\) \['golds'\]"):
        from_dict(EvalConfig, {"golds": {}}, "eval")
    with pytest.raises(ValueError, match=r"eval\.gold\.kind: 'nope' is not one of"):
        from_dict(EvalConfig, {"gold": {"name": "x", "kind": "nope"}}, "eval")
    with pytest.raises(ValueError, match="eval.alpaca.judge_model"):
        from_dict(EvalConfig, {"alpaca": {"judge": "offline"}}, "eval")
    cfg = from_dict(EvalConfig, {"gold": {"name": "x", "kind": "scalar"}, "alpaca": {"glm_inputs": "/g"}}, "eval")
    assert cfg.gold.kind == "scalar" and cfg.alpaca.glm_inputs == "/g"


@pytest.mark.slow
def test_cli_run_mode(tmp_path):
    run = eval_fakes.write_run(tmp_path / "run", eval_fakes.generate_rows(n=4, failed=1))
    (tmp_path / "c.yaml").write_text("eval:\n  gold: {name: vader, kind: vader, format: '{response}'}\n")
    p = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--run", str(run), "--config", str(tmp_path / "c.yaml")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    assert [r["method"] for r in rows] == ["base", "ivg"] and rows[0]["n_failed"] == 1
    assert (run / "summary.parquet").exists() and (run / "report.md").exists()


def test_alpaca_against_another_method(tmp_path):
    """Offline instruction following: each method against the unguided base's response to the same prompt."""
    df = eval_fakes.generate_rows(n=30, failed=1, with_reference=True).drop(columns="reference")
    df.loc[(df["id"] == "p5") & (df["method"] == "base"), "status"] = "failed"  # ivg's p5 has no reference
    run = eval_fakes.write_run(tmp_path / "run", df)
    cfg = EvalConfig(gold=GoldSpec("v", "vader"),
                     alpaca=AlpacaConfig(reference="method:base", glm_inputs=str(eval_fakes.glm_inputs(tmp_path / "glm", n=30))))
    s = evaluate_run(run, cfg, scorer=CountingScorer()).set_index("method")
    samples = pd.read_parquet(run / "evaluated" / "samples.parquet")
    base = samples[(samples["method"] == "base") & (samples["status"] == "ok")].set_index("id")
    ivg = samples[(samples["method"] == "ivg") & samples["preference"].notna()].set_index("id")
    assert base["preference"].isna().all() and "length_controlled_winrate" not in s.loc["base"].dropna()
    np.testing.assert_allclose(ivg["preference"], 1 + 1 / (1 + np.exp(-(ivg["gold_reward"] - base["gold_reward"][ivg.index]))))
    assert s.loc["ivg", "n_annotated"] == 28 and 0 <= s.loc["ivg", "length_controlled_winrate"] <= 100


def pipeline_run(tmp_path, methods=("base", "ivg", "bon-4")):
    """A run directory as generate leaves it: shards of OUTPUT_SCHEMA rows (maps, int32, null scores),
    config.yaml and manifest.json."""
    import yaml

    from pipeline.io import rows_to_table, write_parquet_atomic

    df = eval_fakes.generate_rows(methods=methods, n=4, failed=1)
    shape = {"base": ("none", "none", 1, 1, None), "ivg": ("implicit", "explicit", 2, 2, 6),
             "bon-4": ("none", "explicit", 1, 4, None)}
    for col, i in (("token", 0), ("chunk", 1), ("W", 2), ("K", 3), ("L", 4)):
        df[col] = pd.Series([shape[m][i] for m in df["method"]], index=df.index, dtype=object)
    no_scorer = (df["chunk"] == "none") | (df["status"] == "failed")
    df["score"] = pd.Series([None if n else 0.5 for n in no_scorer], index=df.index, dtype=object)
    df["chunk_scores"] = [None if n else [0.5] for n in no_scorer]
    df["error"] = df["error"].astype(object).where(df["error"].notna(), None)
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    for k, part in enumerate(np.array_split(np.arange(len(df)), 2)):
        write_parquet_atomic(rows_to_table(df.iloc[part].to_dict("records")), run / "shards" / f"{k:06d}-x.parquet")
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "fake"}, "methods": list(methods)}))
    (run / "manifest.json").write_text(json.dumps({"fingerprint": "f00d", "shards": {}, "runs": []}))
    return run


def test_samples_keep_the_shard_schema_with_nulls_where_there_is_no_score(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.io import OUTPUT_SCHEMA

    run = pipeline_run(tmp_path)
    evaluate_run(run, EvalConfig(gold=GoldSpec("v", "vader")), scorer=CountingScorer())
    samples = pq.read_table(run / "evaluated" / "samples.parquet")
    assert samples.schema.names[:len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    for field in OUTPUT_SCHEMA:  # map stays map, int32 stays int32, lists stay lists
        assert samples.schema.field(field.name).type == field.type, field.name
    rows = samples.to_pandas(maps_as_pydicts="strict")
    base = rows[(rows["method"] == "base") & (rows["status"] == "ok")]
    assert base["score"].isna().all() and base["chunk_scores"].isna().all()
    assert rows.loc[rows["method"] == "ivg", "chunk_scores"].dropna().map(list).tolist() == [[0.5]] * 3
    assert rows["model_tokens"].iloc[0] == {"base": 100, "tuned": 50}
    assert samples.schema.field("gold_reward").type == pa.float64()
    assert samples.schema.field("gold_reward_scorer").type == pa.string()


def test_summary_has_cell_shape_betas_gold_tokens_and_wall_time(tmp_path):
    import pyarrow.parquet as pq

    run = pipeline_run(tmp_path)
    summary = evaluate_run(run, EvalConfig(gold=GoldSpec("vader", "vader")), scorer=CountingScorer())
    for column in ("method", "cell", "token", "chunk", "W", "K", "L", "beta_token", "beta_chunk", "n", "n_ok",
                   "n_failed", "gold_mean", "gold_ci_low", "gold_ci_high", "ci", "gold_model", "gold_scorer",
                   "mean_new_tokens", "model_tokens_total", "wall_s", "tokens_per_s"):
        assert column in summary.columns, column
    s = summary.set_index("method")
    assert s.loc["ivg", "cell"] == "implicit token-wise + explicit chunk-level" and s.loc["base", "cell"] == "sampling"
    assert (s.loc["ivg", "W"], s.loc["ivg", "K"], s.loc["ivg", "L"]) == (2, 2, 6)
    assert pd.isna(s.loc["bon-4", "L"]) and s.loc["bon-4", "cell"] == "explicit chunk-level"
    assert pd.isna(s.loc["base", "beta_token"]) and pd.isna(s.loc["base", "beta_chunk"])  # no guidance, no beta
    assert s.loc["ivg", "beta_token"] == 1.0 and pd.isna(s.loc["bon-4", "beta_token"])
    assert s.loc["ivg", "gold_model"] == "vader"
    saved = pq.read_table(run / "summary.parquet")
    assert saved.schema.field("W").type == pa.int64() and saved.column("L").to_pylist() == [None, None, 6]
    assert saved.column("method").to_pylist() == ["base", "bon-4", "ivg"]
    assert saved.column("beta_token").to_pylist() == [None, None, 1.0]


def test_every_parquet_file_carries_the_resolved_config_and_fingerprint(tmp_path):
    import pyarrow.parquet as pq

    run = pipeline_run(tmp_path)
    evaluate_run(run, EvalConfig(gold=GoldSpec("vader", "vader")), scorer=CountingScorer())
    for path in (run / "evaluated" / "samples.parquet", run / "summary.parquet"):
        meta = pq.read_schema(path).metadata
        assert json.loads(meta[b"ivg.config"]) == {"run": {"name": "fake"}, "methods": ["base", "ivg", "bon-4"]}
        assert meta[b"ivg.fingerprint"] == b"f00d"
        made_by = json.loads(meta[b"ivg.eval"])
        assert made_by["gold"]["name"] == "vader" and len(made_by["scorers"]) == 1
        assert "revision" in json.loads(meta[b"ivg.eval_git"])


def test_model_outputs_per_method_for_alpaca_eval(tmp_path):
    run = pipeline_run(tmp_path)
    evaluate_run(run, EvalConfig(gold=GoldSpec("vader", "vader")), scorer=CountingScorer())
    outputs = json.loads((run / "evaluated" / "model_outputs" / "ivg.json").read_text())
    samples = pd.read_parquet(run / "evaluated" / "samples.parquet")
    ok = samples[(samples["method"] == "ivg") & (samples["status"] == "ok")]
    assert outputs == [{"instruction": p, "output": r, "generator": "ivg"} for p, r in zip(ok["prompt"], ok["response"])]
    assert sorted(p.name for p in (run / "evaluated" / "model_outputs").iterdir()) == ["base.json", "bon-4.json", "ivg.json"]


def test_the_plot_has_a_title_the_gold_model_wkl_labels_and_a_wall_time_panel(tmp_path):
    from ivg.eval.report import figure

    run = pipeline_run(tmp_path)
    summary = evaluate_run(run, EvalConfig(gold=GoldSpec("vader", "vader")), scorer=CountingScorer())
    fig = figure(summary, "run: gold reward (vader)")
    assert fig._suptitle.get_text() == "run: gold reward (vader)"
    tokens, wall = fig.axes[:2]
    assert tokens.get_xlabel().startswith("model tokens") and wall.get_xlabel() == "decode wall seconds per prompt"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["base 1,1,–", "bon-4 1,4,–", "ivg 2,2,6"]
    assert fig.legends[0].get_title().get_text() == "method W,K,L"
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG" and "# run: gold reward (vader)" in (run / "report.md").read_text()
