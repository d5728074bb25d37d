import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ivg.eval.config import GoldSpec
from ivg.eval.gold import OFFLINE_REPORT, GoldScorer, OfflineSentimentRecipe, ensure_offline_sentiment
from helpers import eval_fakes

PROMPTS = ["the film was", "the plot", "a", "the acting and story were very"]
RESPONSES = ["great and moving", "dull", "superb film superb", "terrible"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gold")
    return {
        "classifier": eval_fakes.tiny_classifier(root / "clf"),
        "rm": eval_fakes.tiny_reward_model(root / "rm"),
        "encoder": eval_fakes.tiny_encoder(root / "enc"),
        "snippets": eval_fakes.snippets(root / "snippets.parquet"),
        "root": root,
    }


def manual_logits(folder, texts):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with torch.no_grad():  # one text at a time: no padding, the ground truth for any batching
        return torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts]).numpy()


def test_classifier_label_difference(models):
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    logits = manual_logits(models["classifier"], texts)  # labels 0 NEGATIVE, 1 NEUTRAL, 2 POSITIVE
    got = GoldScorer(GoldSpec(str(models["classifier"]), "classifier", batch_size=3)).score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(got, logits[:, 2] - logits[:, 0], atol=1e-5)
    # the labels are looked up by name, so another pair gives another difference
    other = GoldScorer(GoldSpec(str(models["classifier"]), positive_label="NEUTRAL", negative_label="POSITIVE"))
    np.testing.assert_allclose(other.score(PROMPTS, RESPONSES), logits[:, 1] - logits[:, 2], atol=1e-5)


def test_classifier_unknown_label_names_field(models):
    with pytest.raises(ValueError, match="positive_label='pos'.*NEGATIVE"):
        GoldScorer(GoldSpec(str(models["classifier"]), positive_label="pos"))


def test_scalar_reward_model_with_format(models):
    fmt = "{prompt}TL;DR: {response}"
    texts = [fmt.format(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES)]
    expected = manual_logits(models["rm"], texts)[:, 0]
    for batch_size in (1, 4):  # right padding + last-token pooling must not change a score
        got = GoldScorer(GoldSpec(str(models["rm"]), "scalar", format=fmt, batch_size=batch_size)).score(PROMPTS, RESPONSES)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    plain = GoldScorer(GoldSpec(str(models["rm"]), "scalar")).score(PROMPTS, RESPONSES)
    assert not np.allclose(plain, expected, atol=1e-4)  # the format really reaches the model


def test_scalar_needs_one_label(models):
    with pytest.raises(ValueError, match="num_labels=1.*3 labels"):
        GoldScorer(GoldSpec(str(models["classifier"]), "scalar"))


def test_offline_sentiment_trains_saves_and_reuses(models):
    out = models["root"] / "offline"
    recipe = OfflineSentimentRecipe(encoder=str(models["encoder"]), snippets=str(models["snippets"]), C=10.0)
    ensure_offline_sentiment(out, recipe)
    report = json.loads((out / OFFLINE_REPORT).read_text())
    assert report["n_test"] == 48 and report["n_train"] == 192
    assert report["accuracy"] >= 0.75, report  # sentiment is carried by a few words here
    assert 0 <= report["vader_accuracy"] <= 1
    assert (out / "model.safetensors").exists() and json.loads((out / OFFLINE_REPORT).read_text()) == report

    scorer = GoldScorer(GoldSpec(str(out), "offline_sentiment", batch_size=5))
    pos = scorer.score(["", ""], ["great wonderful superb film", "brilliant and moving story"])
    neg = scorer.score(["", ""], ["awful boring dull film", "terrible and tedious story"])
    assert min(pos) > max(neg)

    # the saved head reproduces the logistic regression: batch composition does not matter (masked mean)
    one = GoldScorer(GoldSpec(str(out), "offline_sentiment", batch_size=1)).score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(scorer.score(PROMPTS, RESPONSES), one, atol=1e-4)

    # a second call with the same recipe reuses the folder: no training
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_offline_sentiment(out, recipe) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    # another recipe (here: another regularisation) is another model: it is built again, not reused
    ensure_offline_sentiment(out, dataclasses.replace(recipe, C=0.01))
    assert (out / "model.safetensors").stat().st_mtime_ns != mtime
    assert json.loads((out / OFFLINE_REPORT).read_text())["recipe"]["C"] == 0.01


def test_vader_kind():
    scorer = GoldScorer(GoldSpec("vader", "vader", format="{response}"))
    good, bad = scorer.score(["x", "x"], ["What a wonderful, moving film!", "Awful. Boring and terrible."])
    assert good > 0.5 and bad < -0.5


@pytest.mark.parametrize(
    "kw, field",
    [({"kind": "llm"}, "kind"), ({"dtype": "fp8"}, "dtype"), ({"format": "{prompt}{answer}"}, "format"),
     ({"batch_size": 0}, "batch_size")],
)
def test_spec_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=rf"gold\.{field}:"):
        GoldSpec("m", **kw).validate("gold")
    with pytest.raises(ValueError, match=rf"gold\.{field}:"):
        GoldScorer(GoldSpec("m", **kw))


def test_score_length_mismatch(models):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        GoldScorer(GoldSpec("vader", "vader")).score(["a", "b"], ["c"])
