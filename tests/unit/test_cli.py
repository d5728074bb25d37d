"""The `ivg` command (jobs/cli.py): one entry point, overrides loaded exactly like YAML, fast help,
and user errors caught before Ray starts as one line with exit status 2."""

import json
import subprocess
import sys
import tomllib

import pytest
import yaml

from helpers.pipeline import ROOT, SMOKE, write_prompts
from ivg.config import ConfigError, from_dict
from jobs import cli
from pipeline.config import Config, read_yaml


def ivg(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a job starts Ray: every check here must happen before."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))


# ---------------------------------------------------------------- one entry point

def test_the_console_script_names_the_dispatcher_and_every_command_runs_it():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["ivg"].partition(":")
    assert (module, function) == ("jobs.cli", "main")
    assert set(cli.COMMANDS) == {"run", "generate", "evaluate", "train-guides", "train-gold", "assets", "bench", "submit"}


@pytest.mark.parametrize("command", sorted(set(cli.COMMANDS) - {"bench"}))
def test_help_of_every_command_imports_no_torch_ray_or_arrow(command):
    """--help answers at once: nothing heavy is imported to print it (measured: README, CLI)."""
    code = (f"import sys; from jobs import cli\n"
            f"try:\n    cli.main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'ray', 'pyarrow', 'pandas', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"usage: ivg {command}" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_still_works_and_names_itself():
    out = subprocess.run([sys.executable, "-m", "jobs.generate", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m jobs.generate")
    assert "KEY=VALUE" in out.stdout and "--dry-run" in out.stdout and "--limit N" in out.stdout


def test_no_or_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        ivg("genrate")
    assert e.value.code == 2 and "invalid choice: 'genrate'" in capsys.readouterr().err


# ---------------------------------------------------------------- overrides

def overridden(*pairs: str) -> Config:
    data = cli.apply_overrides(read_yaml(SMOKE), [cli.parse_override(p) for p in pairs])
    return from_dict(Config, data, "config")


def test_an_override_is_exactly_the_same_value_written_in_the_yaml(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data["decode"].update(max_new_tokens=4, temperature=0.5, stop=["\n", "."])
    data["methods"][1]["W"] = 3
    data["methods"][1]["chunk"] = "explicit"
    data["methods"][1]["name"] = "wider"
    data["data"]["id_column"] = None
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    by_hand = from_dict(Config, read_yaml(tmp_path / "c.yaml"), "config")
    by_flags = overridden("decode.max_new_tokens=4", "decode.temperature=0.5", 'decode.stop=["\\n", "."]',
                          "methods[1].W=3", "methods[1].chunk=explicit", "methods[1].name=wider",
                          "data.id_column=null")
    assert by_flags == by_hand and by_flags.decode.max_new_tokens == 4 and by_flags.data.id_column is None


def test_an_override_creates_a_missing_section():
    assert overridden("eval.gold.name=vader", "eval.gold.kind=vader").eval.gold.kind == "vader"


@pytest.mark.parametrize("pair,message", [
    ("decode.max_new_tokenz=4", r"config.decode: unknown key\(s\) \['max_new_tokenz'\]"),
    ("decode.max_new_tokens=four", r"decode.max_new_tokens: must be an integer >= 1, or 'auto'"),
    ("decode.temperature=hot", r"config.decode.temperature: expected a number, got 'hot'"),
    ("decode.top_k=-1", r"decode.top_k: must be >= 0"),
    ("methods[1].W=2", r"methods\[1\].chunk: W\*K > 1 needs a chunk-level scorer"),
    ("methods[20].W=2", r"methods\[20\].W=2: methods is a list of 9, it has no \[20\]"),
    ("decode.max_new_tokens.x=1", r"decode.max_new_tokens is a int, not a mapping"),
    ("decode.max_new_tokens", r"expected KEY=VALUE"),
    ("decode.stop=[", r"decode.stop: the value '\[' is not valid YAML"),
])
def test_a_bad_override_names_the_field(pair, message):
    with pytest.raises(ConfigError, match=message):
        overridden(pair)


# ---------------------------------------------------------------- print-config, dry-run, fail fast

def test_print_config_is_the_resolved_config_and_loads_back(tmp_path, capsys, no_ray):
    assert ivg("generate", "--config", str(SMOKE), "--output", str(tmp_path / "out"), "--limit", "3", "--seed", "7",
               "decode.max_new_tokens=5", "--print-config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    config = from_dict(Config, printed, "config")
    assert (config.data.limit, config.run.seed, config.decode.max_new_tokens) == (3, 7, 5)
    assert config.run.output == str(tmp_path / "out") and not (tmp_path / "out").exists()


def test_dry_run_checks_config_input_and_output_and_starts_nothing(tmp_path, capsys, no_ray):
    prompts = write_prompts(tmp_path / "p.jsonl")
    assert ivg("generate", "--config", str(SMOKE), "--input", str(prompts), "--output", str(tmp_path / "out"),
               "--dry-run") == 0
    assert "8 prompts in 2 shards x 9 methods" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def user_error(capsys, *argv) -> str:
    assert ivg(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_user_errors_are_one_line_exit_2_before_ray_starts(tmp_path, capsys, no_ray):
    good = write_prompts(tmp_path / "p.jsonl")
    gen = ("generate", "--config", str(SMOKE))
    assert "run.output: needs an output directory" in user_error(capsys, *gen)
    dup = write_prompts(tmp_path / "dup.jsonl", ["a", "b"])
    dup.write_text(dup.read_text() + dup.read_text().splitlines()[0] + "\n")
    assert "input rows 0 and 2: id 'p0' appears twice" in user_error(capsys, *gen, "--input", str(dup),
                                                                      "--output", str(tmp_path / "o1"))
    assert "missing column(s) ['text']" in user_error(capsys, *gen, "--input", str(good), "--prompt-column", "text",
                                                       "--output", str(tmp_path / "o2"))
    assert "nowhere.jsonl" in user_error(capsys, *gen, "--input", str(tmp_path / "nowhere.jsonl"),
                                         "--output", str(tmp_path / "o3"))
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in user_error(capsys, *gen, "--input", str(good), "--output", str(tmp_path / "file"))
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))  # nothing left behind

    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"fingerprint": "0123456789abcdef", "shards": {}, "runs": []}))
    assert "holds outputs of another config (fingerprint 0123456789abcdef" in user_error(
        capsys, *gen, "--input", str(good), "--output", str(other))

    models = ("decode.max_new_tokens=4", "models.tuned.name=" + str(tmp_path / "no-such-model"))
    assert "models.tuned.name: cannot load" in user_error(capsys, *gen, "--input", str(good), "--output",
                                                          str(tmp_path / "o4"), *models)


def test_debug_shows_the_traceback(no_ray):
    with pytest.raises(ConfigError, match="run.output"):
        ivg("generate", "--config", str(SMOKE), "--debug")


def test_a_role_asking_for_a_gpu_this_machine_lacks_fails_before_ray(tmp_path, capsys, no_ray, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on this CPU box, whatever runs the test
    gen = ("generate", "--config", str(SMOKE), "--input", str(write_prompts(tmp_path / "p.jsonl")),
           "--output", str(tmp_path / "out"))
    assert "pipeline.servers.base.num_gpus: asks for 1 GPU(s) but this machine has 0" in user_error(
        capsys, *gen, "pipeline.servers.base.num_gpus=1")
    assert "models.base.device: 'cuda' but torch sees no CUDA device" in user_error(
        capsys, *gen, "models.base.device=cuda")


def test_submit_records_the_git_revision_in_the_jobs_environment(capsys):
    from ivg.provenance import git_revision

    assert ivg("submit", "--address", "http://head:8265", "--no-wait", "--dry-run", "--",
               "generate", "--config", "jobs/configs/smoke.yaml", "--output", "/tmp/x") == 0
    cmd = capsys.readouterr().out
    git = git_revision()
    assert f"IVG_GIT_REVISION\": \"{git['revision']}" in cmd and " job submit --address http://head:8265 " in cmd
    assert cmd.rstrip().endswith("-- python -m jobs.cli generate --config jobs/configs/smoke.yaml --output /tmp/x")
    assert "--no-wait" in cmd


# ---------------------------------------------------------------- progress

def test_progress_off_a_terminal_puts_done_total_rate_elapsed_and_eta_on_each_shard_line(monkeypatch):
    from pipeline import coordinator

    clock = [100.0]
    monkeypatch.setattr(coordinator.time, "perf_counter", lambda: clock[0])
    lines = []
    progress = coordinator.Progress(12, lambda line, **kw: lines.append(line), live=False)
    progress.skipped(4)  # found on disk before the servers were up: no work, not in the rate
    progress.start()
    clock[0] = 102.0
    progress.done(4)
    progress.say("1/3 shards | shard 000001", meter=True)
    assert lines == ["[generate]  67% 8/12 [00:02<00:02,  2.00 prompts/s] | 1/3 shards | shard 000001"]


def test_progress_on_a_terminal_is_a_live_bar():
    import io

    from pipeline import coordinator

    screen = io.StringIO()
    progress = coordinator.Progress(12, print, live=True, file=screen)
    progress.start()
    progress.done(12)
    progress.say("3/3 shards", meter=True)
    progress.close()
    assert "[generate] 3/3 shards" in screen.getvalue() and "12/12" in screen.getvalue()


def test_prompt_and_id_column_flags_pick_the_input_columns(tmp_path, capsys, no_ray):
    (tmp_path / "t.csv").write_text("text,n\nthe film,1\na plot,2\n")
    assert ivg("generate", "--config", str(SMOKE), "--input", str(tmp_path / "t.csv"), "--prompt-column", "text",
               "--id-column", "null", "data.columns=[]", "--output", str(tmp_path / "out"), "--dry-run") == 0
    assert "2 prompts in 1 shards" in capsys.readouterr().err


def test_evaluate_uses_the_runs_own_eval_section_and_checks_without_scoring(tmp_path, capsys):
    from helpers import eval_fakes

    run = eval_fakes.write_run(tmp_path / "run", eval_fakes.generate_rows(n=3, failed=1))
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"gold": {"name": "vader", "kind": "vader"}}}))
    assert ivg("evaluate", "--run", str(run), "--print-config", "eval.gold.format='{response}'") == 0
    printed = yaml.safe_load(capsys.readouterr().out)["eval"]["gold"]
    assert (printed["kind"], printed["format"]) == ("vader", "{response}")
    assert ivg("evaluate", "--run", str(run), "--dry-run") == 0
    assert "6 rows (2 failed), methods ['base', 'ivg']; gold vader" in capsys.readouterr().err
    assert not (run / "evaluated").exists()
    assert "reads only the eval: section" in user_error(capsys, "evaluate", "--run", str(run), "decode.top_k=3")


def test_a_config_that_trains_its_guides_first_says_to_use_run(tmp_path, capsys, no_ray):
    config = ROOT / "jobs" / "configs" / "sentiment-default.yaml"
    assert "run it with" in user_error(capsys, "generate", "--config", str(config), "--output", str(tmp_path / "o"))


def test_run_dry_run_checks_the_prompt_table_and_trains_nothing(tmp_path, capsys, no_ray):
    import pandas as pd

    pd.DataFrame({"id": [f"s{i}" for i in range(10)], "text": [f"the film number {i} was fine" for i in range(10)]}
                 ).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "experiment": {"prompts": {"path": str(tmp_path / "t.parquet"), "column": "text", "skip": 4, "n": 5}},
        "models": {"base": {"name": "tiny:base"}}, "eval": {"gold": {"name": "vader", "kind": "vader"}}}))
    assert ivg("run", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out"), "--dry-run") == 0
    assert "10 usable rows: 4 skipped, 5 evaluated, 1 after them for the guides" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert "experiment.prompts.n: skip + n = 12 > 10 prompts" in user_error(
        capsys, "run", "--config", str(tmp_path / "c.yaml"), "--dry-run", "experiment.prompts.n=8")


# ---------------------------------------------------------------- the cluster's user errors, through the CLI

def test_every_user_error_the_cli_names_exists():
    import importlib

    for module, name in cli.USER_ERRORS:
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)


def test_a_search_shape_beyond_this_machines_memory_is_one_line_before_ray(tmp_path, capsys, no_ray):
    gen = ("generate", "--config", str(SMOKE), "--input", str(write_prompts(tmp_path / "p.jsonl")),
           "--output", str(tmp_path / "out"))
    err = user_error(capsys, *gen, "methods[8].W=16384", "methods[8].K=16384")
    assert err.startswith("error: pipeline.shard_size: model server colocated needs at least") and "methods[8]" in err
    assert not (tmp_path / "out").exists()


def test_an_output_directory_another_driver_holds_is_one_line_before_ray_and_left_untouched(tmp_path, capsys,
                                                                                          no_ray):
    from pipeline.io import RunLock

    out = tmp_path / "out"
    out.mkdir()
    held = RunLock(out)
    held.acquire()
    try:
        err = user_error(capsys, "generate", "--config", str(SMOKE), "--input", str(write_prompts(tmp_path / "p.jsonl")),
                         "--output", str(out))
    finally:
        held.release()
    assert f"error: {out}: another driver is writing it (pid " in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written: the lock comes first


def test_evaluating_an_unfinished_run_is_one_line_unless_partial(tmp_path, capsys):
    from helpers import eval_fakes

    run = eval_fakes.write_run(tmp_path / "run", eval_fakes.generate_rows(n=3, failed=1))
    (run / "manifest.json").write_text(json.dumps({"runs": [{"status": "interrupted"}], "shards": {}}))
    gold = ("eval.gold.name=vader", "eval.gold.kind=vader")
    err = user_error(capsys, "evaluate", "--run", str(run), *gold)
    assert "generation is unfinished (its last generate run is 'interrupted'" in err and "--partial" in err
    assert "generation is unfinished" in user_error(capsys, "evaluate", "--run", str(run), "--dry-run", *gold)
    assert ivg("evaluate", "--run", str(run), "--dry-run", "--partial", *gold) == 0
    assert "PARTIAL: its last generate run is 'interrupted'" in capsys.readouterr().err
    assert not (run / "evaluated").exists()
