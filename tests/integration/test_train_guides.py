"""Guide training on tiny models: the held-out layout, DPO and the token RM, caching, cards, the engine.

One training run (module fixture) serves most tests: the untuned model is `tiny-b:untuned` (a Llama
body, so the top-layer trick applies) saved as a real HF folder, and the gold counts vowels,
something a 2-layer character model can learn in a few steps.
"""

import json

import pytest

from ivg.config import ConfigError, GenerationConfig, MethodConfig, ModelSpec, Models
from ivg.engine import Engine
from ivg.models import load
from ivg.tiny import tiny_model
from ivg.offline.store import MARKER
from ivg.train import guides as train
from ivg.train.config import DPOSettings, TokenRMSettings, TrainConfig, TrainSettings
from ivg.train.pairs import accuracy, encode, label_pairs, pair_values, sample_pairs

pytestmark = pytest.mark.slow  # DPO and token RM training

VOWELS = set("aeiouAEIOU")
EVALUATED = [f"Eval {i}: the film" for i in range(4)]
# held out first, then training; the repeats of an evaluated and a held-out prompt are never trained on
PROMPTS = [f"Held {i}: the film" for i in range(16)] + [EVALUATED[0], "Held 0: the film"] + \
          [f"Review {i}: the film" for i in range(24)]
SETTINGS = TrainSettings(n_prompts=24, responses=4, heldout_prompts=16, max_new_tokens=12, seed=0)
DPO = DPOSettings(layers=1, beta=0.5, lr=3e-3, epochs=4, batch_size=4, val_prompts=8, seed=0)


def vowel_gold(prompts, responses):
    return [float(sum(c in VOWELS for c in r)) for r in responses]


def save_tiny(path, name="tiny-b:untuned"):
    model, tok = tiny_model(name)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return ModelSpec(str(path), dtype="float32")  # samples independent of the CPU (auto: bfloat16 where fast)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("guides")
    config = TrainConfig(untuned=save_tiny(root / "untuned"), out=str(root / "out"), settings=SETTINGS, dpo=DPO,
                         token_rm=TokenRMSettings(C=1.0, shrink=2.0))
    paths = train.train_guides(config, PROMPTS, vowel_gold, "vowels", EVALUATED, log=lambda _: None)
    return config, paths


def samples(paths):
    return [json.loads(line) for line in open(paths.dir / "samples.jsonl")]


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


def test_samples_follow_the_layout(run):
    config, paths = run
    rows = samples(paths)
    held = {r["prompt"] for r in rows if r["split"] == "heldout"}
    trained = {r["prompt"] for r in rows if r["split"] == "train"}
    assert held == set(PROMPTS[:16]) and len(trained) == 24
    assert not trained & (held | set(EVALUATED))
    per_prompt = {}
    for r in rows:
        per_prompt.setdefault((r["split"], r["i"]), []).append(r)
    assert all(len(v) == 2 for k, v in per_prompt.items() if k[0] == "heldout")  # one pair per held-out prompt
    assert sorted(len(v) for k, v in per_prompt.items() if k[0] == "train") == [4] * 24


def test_both_guides_learn_and_are_measured_on_held_out_pairs(run):
    config, paths = run
    record = json.loads((paths.dir / MARKER).read_text())["facts"]
    m = record["metrics"]
    assert m["heldout_pairs"] >= 5 and m["val_pairs"] >= 4  # vowel counts tie often: those pairs are dropped
    assert m["implicit"]["train"] >= 0.8, m["implicit"]
    # a vowel count is not linear in a random 2-layer model's last state: the token RM's learning is
    # tested on synthetic states (tests/unit/test_train_recipes.py); here, that it is fitted and measured
    assert m["token_rm"]["train"] is not None
    assert m["implicit"]["heldout"] is not None and m["token_rm"]["heldout"] is not None
    # the saved folders, loaded as the engine loads them, give the values measured from the features
    assert m["checked"]["implicit_gap"] < 1e-3 and m["checked"]["token_rm_gap"] < 1e-3, m["checked"]
    assert record["dpo"]["exactness_gap"] < 1e-4


def test_held_out_accuracy_recomputed_from_the_saved_folders(run):
    config, paths = run
    tuned, untuned, rm = load(paths.tuned), load(paths.untuned), load(paths.explicit)
    rows = samples(paths)
    held = [{"prompt": r["prompt"], "a": r["response"], "b": s["response"]}
            for r, s in zip(rows[::2], rows[1::2]) if r["split"] == "heldout"]
    enc = encode(untuned, label_pairs(held, vowel_gold))
    lt, lu = pair_values(tuned.model, enc, "logp"), pair_values(untuned.model, enc, "logp")
    implicit = accuracy([(ct - cu, rt - ru) for (ct, rt), (cu, ru) in zip(lt, lu)])
    card = json.loads((paths.dir / "tuned" / "card.json").read_text())
    assert card["heldout"]["pairs"] == len(enc)
    assert card["heldout"]["implicit_accuracy"] == pytest.approx(implicit)
    assert card["heldout"]["token_rm_accuracy"] == pytest.approx(accuracy(pair_values(rm.model, enc, "q")))
    # the head is its own (untied) parameter, saved and loaded as fitted
    assert rm.model.get_output_embeddings().weight.data_ptr() != rm.model.get_input_embeddings().weight.data_ptr()


def test_model_cards(run):
    config, paths = run
    for role in ("tuned", "explicit"):
        card = (paths.dir / role / "README.md").read_text()
        assert "Held-out gold accuracy" in card and "vowels" in card and "implicit value" in card
        data = json.loads((paths.dir / role / "card.json").read_text())
        assert data["guide"] == role and data["heldout"]["prompts"] == 16
        assert set(data["heldout"]) >= {"implicit_accuracy", "token_rm_accuracy", "pairs"}
        assert (paths.dir / role / "model.safetensors").is_file()


def test_second_call_reuses_the_cache(run, monkeypatch):
    config, paths = run
    calls = []
    monkeypatch.setattr(train, "train_dpo", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(train, "sample_pairs", lambda *a, **k: calls.append(a))
    assert train.train_guides(config, PROMPTS, vowel_gold, "vowels", EVALUATED, log=lambda _: None) == paths
    assert calls == []
    layout = train.guide_layout(PROMPTS, EVALUATED, SETTINGS.heldout_prompts, SETTINGS.n_prompts)
    key = train.build_key(config, "vowels", layout)
    other = TrainConfig(**{**config.__dict__, "dpo": DPOSettings(**{**DPO.__dict__, "lr": 1e-3})})
    assert train.build_key(other, "vowels", layout) != key
    assert train.samples_key(other, "vowels", layout) == train.samples_key(config, "vowels", layout)
    moved = train.guide_layout(PROMPTS[1:] + ["x"], EVALUATED, SETTINGS.heldout_prompts, SETTINGS.n_prompts)
    assert train.build_key(config, "vowels", moved) != key
    assert train.build_key(config, "consonants", layout) != key  # another gold: other labels


def test_new_dpo_settings_reuse_the_samples(run, tmp_path, monkeypatch):
    config, paths = run
    calls = []
    monkeypatch.setattr(train, "sample_pairs", lambda *a, **k: calls.append(a))
    other = TrainConfig(**{**config.__dict__, "dpo": DPOSettings(**{**DPO.__dict__, "epochs": 1}), "token_rm": None})
    again = train.train_guides(other, PROMPTS, vowel_gold, "vowels", EVALUATED, log=lambda _: None)
    assert calls == [] and again.dir != paths.dir and again.explicit is None
    assert samples(again) == samples(paths)


def test_gpt2_trains_every_layer_and_force_retrains(tmp_path):
    settings = TrainSettings(n_prompts=4, responses=4, heldout_prompts=2, max_new_tokens=6)
    config = TrainConfig(untuned=ModelSpec("tiny:untuned"), out=str(tmp_path), settings=settings,
                         dpo=DPOSettings(layers=None, epochs=1, batch_size=4))
    first = train.train_guides(config, PROMPTS, vowel_gold, "vowels", log=lambda _: None)
    stamp = (first.dir / MARKER).stat().st_mtime_ns
    assert train.train_guides(config, PROMPTS, vowel_gold, "vowels", log=lambda _: None).dir == first.dir
    assert (first.dir / MARKER).stat().st_mtime_ns == stamp
    again = train.train_guides(config, PROMPTS, vowel_gold, "vowels", force=True, log=lambda _: None)
    assert again.dir == first.dir and (first.dir / MARKER).stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.dir.name, *[p.name for p in tmp_path.glob("samples-*")]])
    with pytest.raises(ValueError, match="layers: null"):  # GPT-2 adds position embeddings: no top-layer trick
        train.train_guides(TrainConfig(**{**config.__dict__, "dpo": DPOSettings(layers=1)}), PROMPTS, vowel_gold,
                           "vowels", log=lambda _: None)


def test_guides_run_in_the_engine(run):
    config, paths = run
    models = Models(base=ModelSpec("tiny-b:base"), **paths.models())
    methods = (MethodConfig(token="implicit", chunk="explicit", W=2, K=2, L=4),
               MethodConfig(token="explicit", chunk="implicit", W=2, K=2, L=4))
    engine = Engine.local(GenerationConfig(models=models, methods=methods))
    for method in methods:
        rows = engine.run([{"id": "0", "prompt": "A film"}, {"id": "1", "prompt": "Another"}], method)
        assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["response"] is not None for r in rows)


@pytest.mark.parametrize("field,value", [("n_prompts", 0), ("max_new_tokens", -1), ("temperature", 0.0),
                                         ("batch", 0), ("stop", ("",))])
def test_settings_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"train\.settings\.{field}\b"):
        TrainSettings(**{field: value})


def test_too_few_prompts_names_n_prompts(tmp_path):
    config = TrainConfig(untuned=ModelSpec("tiny:untuned"), out=str(tmp_path),
                         settings=TrainSettings(n_prompts=5, heldout_prompts=1))
    with pytest.raises(ConfigError, match=r"train\.settings\.n_prompts"):
        train.train_guides(config, PROMPTS[:4], vowel_gold, "g")


def test_job_main_trains_and_prints_the_guides(tmp_path, capsys):
    from jobs.train_guides import main

    # a tiny random sentiment classifier as the gold: random text rarely moves VADER off 0 (all ties)
    gold, tok = tiny_model("tiny:gold", "classifier", num_labels=2)
    gold.config.id2label, gold.config.label2id = {0: "NEGATIVE", 1: "POSITIVE"}, {"NEGATIVE": 0, "POSITIVE": 1}
    gold.save_pretrained(tmp_path / "gold")
    tok.save_pretrained(tmp_path / "gold")
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"id": "{i}", "prompt": "{p}"}}\n'
                                                    for i, p in enumerate(["A film", "The movie was", "I think", "One day",
                                                                          "Two cats", "So it goes", "Why"])))
    (tmp_path / "c.yaml").write_text(f"""
experiment:
  prompts: {{path: "{tmp_path / 'prompts.jsonl'}", n: 2}}
train:
  untuned: {{name: "tiny:untuned"}}
  gold: {{kind: classifier, name: "{tmp_path / 'gold'}"}}
  settings: {{n_prompts: 3, responses: 2, heldout_prompts: 2, max_new_tokens: 6, temperature: 1.0}}
  dpo: {{layers: null, epochs: 1, batch_size: 4}}
  out: {tmp_path / "out"}
""")
    assert main(["--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "tuned:" in out and "kind: token_reward" in out
    (tmp_path / "bad.yaml").write_text("train: {untuned: {name: x}, gold: {kind: vader, name: v}, "
                                       "dpo: {epochs: 0}}")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "train.dpo.epochs" in capsys.readouterr().err
