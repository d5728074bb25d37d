"""The main job end to end on tiny models: prompts, guide training, generate on Ray, evaluate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ivg.tiny import tiny_model

pytestmark = pytest.mark.slow  # subprocess jobs with Ray, guide training

ROOT = Path(__file__).resolve().parents[2]


def folder(name: str, path: Path, kind: str = "causal_lm") -> str:
    model, tok = tiny_model(name, kind)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.timeout(300)
def test_main_job_runs_every_stage_and_reruns_from_cache(tmp_path):
    words = ["good", "great", "bad", "awful", "fine", "dull"]
    texts = [f"the film number {i} was {words[i % 6]} and {words[(i * 5) % 6]} indeed" for i in range(60)]
    pd.DataFrame({"id": [f"s{i}" for i in range(60)], "text": texts,
                  "label": [int(words[i % 6] in ("good", "great", "fine")) for i in range(60)]}
                 ).to_parquet(tmp_path / "snippets.parquet")
    untuned = folder("tiny-b:untuned", tmp_path / "untuned")  # a Llama body: DPO trains its top layer
    config = {
        "experiment": {
            "assets": [],
            "prompts": {"path": str(tmp_path / "snippets.parquet"), "column": "text", "prefix_words": 4,
                        "skip": 2, "n": 6},
        },
        "train": {"untuned": {"name": untuned},
                  "settings": {"n_prompts": 8, "heldout_prompts": 4, "max_new_tokens": 6},
                  "dpo": {"layers": 1, "epochs": 1, "batch_size": 4, "lr": 1e-3}},
        "run": {"name": "tiny-main"},
        "models": {"base": {"name": folder("tiny-b:base", tmp_path / "base"), "template": "Review: {prompt}"}},
        "decode": {"max_new_tokens": 6},
        "methods": [{"name": "base"}, {"name": "ivg", "token": "implicit", "chunk": "explicit", "W": 2, "K": 2, "L": 3}],
        "pipeline": {"placement": "colocated", "search_actors": 1, "shard_size": 4,
                     "servers": {"colocated": {"num_cpus": 0.5}}},
        "eval": {"gold": {"name": folder("tiny:gold", tmp_path / "gold", "classifier"), "kind": "scalar"}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "IVG_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    run = [sys.executable, "-m", "jobs.run", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run"),
           "--num-cpus", "2"]
    first = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = pd.read_parquet(tmp_path / "run" / "summary.parquet").set_index("method")
    assert list(summary.index) == ["base", "ivg"] and (summary["n_ok"] == 6).all()
    assert summary.loc["ivg", "model_tokens_explicit"] > 0 and summary.loc["ivg", "model_tokens_implicit"] > 0
    assert (tmp_path / "run" / "report.md").is_file() and "[done]" in first.stdout
    [guides] = (tmp_path / "cache" / "guides").glob("*/tuned/card.json")
    assert json.loads(guides.read_text())["heldout"]["pairs"] >= 1
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["models"]["explicit"]["kind"] == "token_reward"  # the token RM is the explicit value
    evaluated = {json.loads(line)["prompt"] for line in open(tmp_path / "run" / "prompts.jsonl")}
    samples = [json.loads(line) for line in open(guides.parent.parent / "samples.jsonl")]
    assert len(evaluated) == 6 and not evaluated & {r["prompt"] for r in samples if r["split"] == "train"}

    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "shards").glob("*.parquet")}
    again = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "guides: cached" in again.stdout
    assert len(shards) == 2 and {p: p.stat().st_mtime_ns for p in shards} == shards  # nothing recomputed
    assert pd.read_parquet(tmp_path / "run" / "summary.parquet")["gold_mean"].tolist() == summary["gold_mean"].tolist()


def test_bad_experiment_section_names_the_field(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"experiment": {"prompts": {"path": "x.parquet", "colour": 1}},
                                                     "models": {"base": {"name": "tiny:base"}},
                                                     "eval": {"gold": {"name": "vader", "kind": "vader"}}}))
    out = subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(tmp_path / "c.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "experiment.prompts" in out.stderr and "colour" in out.stderr
