"""The reward probe: a linear head on a frozen body, saved as a classifier the engine scores with."""

import random

import pytest

from ivg.config import ConfigError, DecodeConfig, GenerationConfig, MethodConfig, Models, ModelSpec
from ivg.engine import Engine
from ivg.protocol import Chunk, Open
from ivg.offline.store import MARKER
from ivg.train.config import ProbeSettings
from ivg.train.probe import train_probe
from ivg.tiny import tiny_model


@pytest.fixture
def body(tmp_path):
    model, tok = tiny_model("tiny:base")
    model.save_pretrained(tmp_path / "body")
    tok.save_pretrained(tmp_path / "body")
    return ModelSpec(str(tmp_path / "body"), device="cpu")


def labelled(n=200, seed=0):
    rng = random.Random(seed)
    words = ["the film", "a plot", "this cast", "my evening"]
    rows = [(f"{rng.choice(words)} was {'good' if i % 2 else 'bad'}", i % 2) for i in range(n)]
    return [t for t, _ in rows], [y for _, y in rows]


def test_probe_learns_cached_and_scores_in_the_engine(body, tmp_path, capsys):
    texts, labels = labelled()
    spec = train_probe(body, texts, labels, tmp_path / "probe", ProbeSettings(n=200, seed=1))
    assert "held-out accuracy 1.000" in capsys.readouterr().out
    assert (tmp_path / "probe" / MARKER).is_file() and spec.kind == "classifier"
    mtime = (tmp_path / "probe" / MARKER).stat().st_mtime
    train_probe(body, texts, labels, tmp_path / "probe", ProbeSettings(n=200, seed=1))
    assert (tmp_path / "probe" / MARKER).stat().st_mtime == mtime  # cached: not fitted again

    # the saved folder is an explicit value the engine scores prefixes with, incrementally
    method = MethodConfig(chunk="explicit", W=1, K=4, L=None)
    engine = Engine.local(GenerationConfig(models=Models(base=body, explicit=spec), methods=(method,),
                                           decode=DecodeConfig(max_new_tokens=3)))
    values = engine.roles.roles["explicit"]
    values.handle(Open("s", ("the film was",) * 2, (0, 1)))
    ids = engine.tokenizer([" good", " bad"], add_special_tokens=False).input_ids
    good, bad = values.handle(Chunk("s", tuple(map(tuple, ids)), (" good", " bad"))).values
    assert good > bad


def test_probe_settings_name_the_field():
    with pytest.raises(ConfigError, match="experiment.explicit_probe.settings.heldout"):
        ProbeSettings(heldout=1.5)
