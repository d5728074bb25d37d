"""The README's walkthrough through the `ivg` entry point, as a user runs it: generate the smoke config,
evaluate it, read the results; the job's own output is the progress, not Ray's or transformers' noise."""

import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers.pipeline import RAY_ENV, ROOT, SMOKE

pytestmark = pytest.mark.slow  # two subprocess jobs, one with an embedded Ray

NOISE = ("Traceback", " E ", "ERROR", "FutureWarning", "past_key_values", "constructor arguments")


def ivg(*argv, timeout=240) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=ROOT, env={**os.environ, **RAY_ENV},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_generate_evaluate_and_read_the_results(tmp_path):
    run = tmp_path / "smoke"
    gen = ivg("generate", "--config", str(SMOKE), "--output", str(run), "--num-cpus", "2")
    log = gen.stdout + gen.stderr
    assert gen.returncode == 0, log
    assert "[check]" in log and "12 prompts in 3 shards x 9 methods" in log and "[load] ready in" in log
    assert "100% 12/12" in log and "prompts/s" in log and "finished: 3 shards written" in log
    assert not [n for n in NOISE if n in log], log

    shard = pq.read_table(next((run / "shards").glob("*.parquet")))
    config = json.loads(shard.schema.metadata[b"ivg.config"])
    assert config["decode"]["max_new_tokens"] == 12 and shard.schema.metadata[b"ivg.fingerprint"]

    ev = ivg("evaluate", "--run", str(run), "eval.gold.kind=vader", "eval.gold.name=vader")
    assert ev.returncode == 0, ev.stderr
    assert "gold_reward: 0 reused, 108 scored" in ev.stderr
    rows = json.loads(ev.stdout.strip().splitlines()[-1])
    assert len(rows) == 9 and {r["gold_model"] for r in rows} == {"vader"}

    summary = pd.read_parquet(run / "summary.parquet")
    samples = pq.read_table(run / "evaluated" / "samples.parquet").to_pandas(maps_as_pydicts="strict")
    assert len(samples) == 12 * 9 and samples["gold_reward"].notna().all()
    assert summary.set_index("method").loc["base", "cell"] == "sampling"
    assert len(list((run / "evaluated" / "model_outputs").glob("*.json"))) == 9

    again = ivg("generate", "--config", str(SMOKE), "--output", str(run), "--num-cpus", "2")
    assert again.returncode == 0 and "0 shards written, 3 skipped" in again.stdout, again.stderr
    assert "[load]" not in again.stderr  # nothing to compute: no model loaded
