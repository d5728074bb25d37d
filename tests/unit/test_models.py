"""Loading models from folders and GGUF files, and the safety rules around it."""

import pytest
import torch

from ivg.config import ModelSpec
from ivg.engine import Engine
from ivg.models import load
from ivg.tiny import tiny_model

from helpers.models import cell, config, rows
from helpers.gguf import write_tiny_llama_gguf


def test_local_folder_loads_and_runs(tmp_path):
    model, tok = tiny_model("tiny:base")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    loaded = load(ModelSpec(str(tmp_path / "base"), dtype="float32", device="cpu"))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded.model(ids).logits, model(ids).logits, atol=1e-6)
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()


def test_classifier_folder_loads_as_a_classifier(tmp_path):
    model, tok = tiny_model("tiny:rm", "classifier")
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded = load(ModelSpec(str(tmp_path / "rm"), kind="classifier", device="cpu"))
    assert loaded.model.config.num_labels == 1 and hasattr(loaded.model, "score")


def test_pickle_checkpoints_need_allow_pickle_in_the_config(tmp_path):
    model, tok = tiny_model("tiny:base")
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"only pickle checkpoint\(s\) \['pytorch_model.bin'\].*allow_pickle: true"):
        load(ModelSpec(str(folder), device="cpu"))
    assert load(ModelSpec(str(folder), device="cpu", allow_pickle=True)).model is not None


def test_gguf_file_loads(tmp_path):
    path = tmp_path / "tiny.gguf"
    embed = write_tiny_llama_gguf(path)
    loaded = load(ModelSpec(str(path), dtype="float32", device="cpu"))
    got = loaded.model.get_input_embeddings().weight.detach().numpy()
    assert got.shape == embed.shape and abs(got - embed).max() < 1e-6


def test_unknown_model_id_fails_clearly(tmp_path):
    with pytest.raises(OSError, match="does-not-exist"):
        load(ModelSpec(str(tmp_path / "does-not-exist"), device="cpu"))


def test_float32_engine_runs_every_cell():
    """Production dtype: the same code path as the float64 tests, without exactness claims."""
    cfg = config([cell(t, c) for t in ("none", "implicit") for c in ("none", "explicit")])
    cfg = type(cfg)(models=type(cfg.models)(**{r: (None if getattr(cfg.models, r) is None else
                    ModelSpec(**{**getattr(cfg.models, r).__dict__, "dtype": "float32"}))
                    for r in ("base", "tuned", "untuned", "explicit")}),
                    decode=cfg.decode, methods=cfg.methods, seed=cfg.seed)
    engine = Engine.local(cfg)
    for m in cfg.methods:
        got = engine.run(rows(), m)
        assert all(r["status"] == "ok" and r["n_new_tokens"] > 0 for r in got)
