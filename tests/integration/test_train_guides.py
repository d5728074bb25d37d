"""Guide training on tiny models: the effect of DPO and of the token RM, caching, loading, the engine.

One training run (module fixture) serves most tests: the untuned model is `tiny:untuned` saved as a real
HF folder, and the gold counts vowels, something a 2-layer character model can learn in a few steps.
"""

import json

import pytest

from ivg.config import ConfigError, GenerationConfig, MethodConfig, ModelSpec, Models
from ivg.engine import Engine
from ivg.models import load
from ivg.tiny import tiny_model
from ivg.offline.store import MARKER
from ivg.train import guides as train
from ivg.train.config import TrainConfig, TrainSettings
from ivg.train.pairs import accuracy, encode, label_pairs, pair_values, sample_pairs

pytestmark = pytest.mark.slow  # DPO and token RM training

VOWELS = set("aeiouAEIOU")
PROMPTS = [f"Review {i}: the film" for i in range(24)]
SETTINGS = TrainSettings(n_prompts=24, pairs_per_prompt=2, max_new_tokens=12, heldout=0.25, beta=0.1,
                         lr=5e-3, rm_lr=5e-3, epochs=3, batch_size=8, lora_r=8, lora_alpha=16, seed=0)


def vowel_gold(prompts, responses):
    return [float(sum(c in VOWELS for c in r)) for r in responses]


def save_tiny(path, name="tiny:untuned"):
    model, tok = tiny_model(name)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return ModelSpec(str(path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("guides")
    config = TrainConfig(untuned=save_tiny(root / "untuned"), out=str(root / "out"), settings=SETTINGS)
    paths = train.train_guides(config, PROMPTS, vowel_gold, "vowels", log=lambda _: None)
    return config, paths


def test_sample_pairs_is_deterministic(tmp_path):
    spec = save_tiny(tmp_path / "u")
    first = sample_pairs(spec, PROMPTS[:3], 2, 8, 1.0, seed=1)
    assert first == sample_pairs(spec, PROMPTS[:3], 2, 8, 1.0, seed=1)
    assert len(first) == 6 and all(p["a"] != p["b"] for p in first)
    assert sample_pairs(spec, PROMPTS[:3], 2, 8, 1.0, seed=2) != first
    # a prompt's pairs do not depend on the other prompts sampled with it
    assert sample_pairs(spec, PROMPTS[:1], 2, 8, 1.0, seed=1) == first[:2]


def test_label_pairs_orders_by_gold_and_drops_ties():
    pairs = [{"prompt": "p", "a": "xx", "b": "aa"}, {"prompt": "q", "a": "ae", "b": "e"},
             {"prompt": "r", "a": "a", "b": "o"}, {"prompt": "s", "a": "", "b": "zz"}]
    assert label_pairs(pairs, vowel_gold) == [
        {"prompt": "p", "chosen": "aa", "rejected": "xx", "margin": 2.0},
        {"prompt": "q", "chosen": "ae", "rejected": "e", "margin": 1.0}]


def test_dpo_makes_the_implicit_reward_prefer_gold_chosen(run):
    config, paths = run
    tuned, untuned = load(paths.tuned), load(paths.untuned)
    rows = [json.loads(line) for line in open(paths.dir / "pairs.jsonl")]
    enc = encode(untuned, [r for r in rows if r["split"] == "train"])
    lt, lu = pair_values(tuned.model, enc, "logp"), pair_values(untuned.model, enc, "logp")
    implicit = [(ct - cu, rt - ru) for (ct, rt), (cu, ru) in zip(lt, lu)]
    before = accuracy([(0.0, 0.0)] * len(enc))  # tuned == untuned before training: every pair ties
    assert before == 0 and accuracy(implicit) >= 0.8, accuracy(implicit)
    assert sum(c - r for c, r in implicit) > 0


def test_token_rm_orders_pairs_by_last_q(run):
    config, paths = run
    rm = load(paths.explicit)
    rows = [json.loads(line) for line in open(paths.dir / "pairs.jsonl")]
    enc = encode(rm, [r for r in rows if r["split"] == "train"])
    assert accuracy(pair_values(rm.model, enc, "q")) >= 0.7
    # the head is its own (untied) parameter, saved and loaded as trained
    assert rm.model.get_output_embeddings().weight.data_ptr() != rm.model.get_input_embeddings().weight.data_ptr()


def test_record_and_model_cards(run):
    config, paths = run
    record = json.loads((paths.dir / MARKER).read_text())["facts"]
    assert record["metrics"]["train"]["implicit_accuracy"] >= 0.8
    assert record["metrics"]["heldout"]["pairs"] > 0
    assert record["config"]["settings"]["lora_r"] == 8
    for role in ("tuned", "explicit"):
        card = (paths.dir / role / "README.md").read_text()
        assert "Gold accuracy" in card and "held out" in card and "vowels" in card
        assert (paths.dir / role / "model.safetensors").is_file()


def test_second_call_reuses_the_cache(run, monkeypatch):
    config, paths = run
    calls = []
    monkeypatch.setattr(train, "train_dpo", lambda *a, **k: calls.append(a))
    assert train.train_guides(config, PROMPTS, vowel_gold, "vowels", log=lambda _: None) == paths
    assert calls == []
    # other settings: another folder
    other = TrainConfig(**{**config.__dict__, "settings": TrainSettings(**{**SETTINGS.__dict__, "seed": 1})})
    key = train.build_key(config, "vowels", PROMPTS)
    assert train.build_key(other, "vowels", PROMPTS) != key
    assert train.build_key(config, "vowels", PROMPTS[:-1] + ["x"]) != key
    assert train.build_key(config, "consonants", PROMPTS) != key  # another gold: other labels


def test_force_retrains(tmp_path):
    settings = TrainSettings(n_prompts=4, max_new_tokens=6, heldout=0.0, epochs=1, batch_size=4, lora_r=None)
    config = TrainConfig(untuned=ModelSpec("tiny:untuned"), out=str(tmp_path), settings=settings)
    first = train.train_guides(config, PROMPTS, vowel_gold, "vowels", log=lambda _: None)
    stamp = (first.dir / MARKER).stat().st_mtime_ns
    assert train.train_guides(config, PROMPTS, vowel_gold, "vowels", log=lambda _: None).dir == first.dir
    assert (first.dir / MARKER).stat().st_mtime_ns == stamp
    again = train.train_guides(config, PROMPTS, vowel_gold, "vowels", force=True, log=lambda _: None)
    assert again.dir == first.dir and (first.dir / MARKER).stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.dir.name]  # no temp folders left


def test_guides_run_in_the_engine(run):
    config, paths = run
    models = Models(base=ModelSpec("tiny:base"), **paths.models())
    methods = (MethodConfig(token="implicit", chunk="explicit", W=2, K=2, L=4),
               MethodConfig(token="explicit", chunk="implicit", W=2, K=2, L=4))
    engine = Engine.local(GenerationConfig(models=models, methods=methods))
    for method in methods:
        rows = engine.run([{"id": "0", "prompt": "A film"}, {"id": "1", "prompt": "Another"}], method)
        assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["response"] is not None for r in rows)


@pytest.mark.parametrize("field,value", [("n_prompts", 0), ("max_new_tokens", -1), ("temperature", 0.0),
                                         ("heldout", 1.0), ("beta", 0.0), ("lr", float("nan")), ("lora_r", 0),
                                         ("batch_size", 0), ("stop", ("",))])
def test_settings_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"train\.settings\.{field}\b"):
        TrainSettings(**{field: value})


def test_too_few_prompts_names_n_prompts(tmp_path):
    config = TrainConfig(untuned=ModelSpec("tiny:untuned"), out=str(tmp_path),
                         settings=TrainSettings(n_prompts=5))
    with pytest.raises(ConfigError, match=r"train\.settings\.n_prompts"):
        train.train_guides(config, PROMPTS[:2], vowel_gold, "g")


def test_job_main_trains_and_prints_the_guides(tmp_path, capsys):
    from jobs.train_guides import main

    # a tiny random sentiment classifier as the gold: random text rarely moves VADER off 0 (all ties)
    gold, tok = tiny_model("tiny:gold", "classifier", num_labels=2)
    gold.config.id2label, gold.config.label2id = {0: "NEGATIVE", 1: "POSITIVE"}, {"NEGATIVE": 0, "POSITIVE": 1}
    gold.save_pretrained(tmp_path / "gold")
    tok.save_pretrained(tmp_path / "gold")
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"id": "{i}", "prompt": "{p}"}}\n'
                                                    for i, p in enumerate(["A film", "The movie was", "I think"])))
    (tmp_path / "c.yaml").write_text(f"""
experiment:
  prompts: {{path: "{tmp_path / 'prompts.jsonl'}"}}
train:
  untuned: {{name: "tiny:untuned"}}
  gold: {{kind: classifier, name: "{tmp_path / 'gold'}"}}
  settings: {{n_prompts: 3, max_new_tokens: 6, heldout: 0.0, epochs: 1, batch_size: 4, temperature: 1.0}}
  out: {tmp_path / "out"}
""")
    assert main(["--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "tuned:" in out and "kind: token_reward" in out
    (tmp_path / "bad.yaml").write_text("train: {untuned: {name: x}, gold: {kind: vader, name: v}, "
                                       "settings: {epochs: 0}}")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "train.settings.epochs" in capsys.readouterr().err
