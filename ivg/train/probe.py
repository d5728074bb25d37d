"""A reward probe: a frozen causal LM body and a linear head fitted to labelled texts.

The cheapest explicit value that reads text the way the base does: one forward pass over labelled
texts (e.g. human-rated movie reviews), a logistic regression on each text's last-token hidden state,
saved as an ordinary HF sequence classifier (num_labels=1) whose `score` head is the fitted line. The
engine then scores prefixes incrementally (ExplicitRole, kind classifier): a chunk costs its new tokens.
"""

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from ivg.config import ModelSpec
from ivg.models import load_tokenizer, resolve_name, source
from ivg.offline.store import build_once, cache_root, digest, is_built
from ivg.train.config import ProbeConfig, ProbeSettings

PROBE_VERSION = 1  # bump when what the probe fits changes
REPORT = "probe.json"


@torch.no_grad()
def last_hidden(model, tokenizer, texts: list[str], batch_size: int, max_tokens: int) -> np.ndarray:
    """(N, hidden): each text's hidden state at its last token, positions counted as the engine does."""
    tokenizer.padding_side = "left"  # the last column is every row's last token
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens).to(model.device)
        positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.base_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                  position_ids=positions).last_hidden_state[:, -1]
        out.append(hidden.float().cpu().numpy())
    return np.concatenate(out)


def ensure_probe(config: ProbeConfig, log=print) -> ModelSpec:
    """The probe of `config` (its labelled texts read from config.path), fitted once per key."""
    import pandas as pd

    path = resolve_name(config.path)
    frame = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_json(path, lines=True)
    for field in ("text_column", "label_column"):
        if getattr(config, field) not in frame.columns:
            raise ValueError(f"experiment.explicit_probe.{field}: {getattr(config, field)!r} is not a column of {path}")
    texts, labels = list(frame[config.text_column]), list(frame[config.label_column])
    out = Path(config.out).expanduser() if config.out else cache_root() / "probes" / digest(probe_key(config.body, texts, labels, config.settings))
    return train_probe(config.body, texts, labels, out, config.settings, log)


def probe_key(body: ModelSpec, texts: list[str], labels: list[int], settings: ProbeSettings) -> dict:
    return {"recipe": "probe", "version": PROBE_VERSION, "body": asdict(body), "settings": asdict(settings),
            "data": digest([list(map(str, texts)), [int(y) for y in labels]], 64)}


def train_probe(body: ModelSpec, texts: list[str], labels: list[int], out_dir, settings: ProbeSettings,
                log=print) -> ModelSpec:
    """Fit, measure on held-out texts, save as an HF sequence classifier (once per key); returns its ModelSpec."""
    out_dir = Path(out_dir).expanduser()
    key = probe_key(body, texts, labels, settings)
    if is_built(out_dir, key):
        log(f"probe: cached {out_dir}")
    else:
        build_once(out_dir, key, lambda tmp: _fit(body, texts, labels, tmp, settings, log))
    return ModelSpec(str(out_dir), kind="classifier", template=body.template)


def _fit(body: ModelSpec, texts: list[str], labels: list[int], out_dir: Path, settings: ProbeSettings, log) -> dict:
    from sklearn.linear_model import LogisticRegression

    order = list(range(len(texts)))
    random.Random(settings.seed).shuffle(order)
    order = order[:settings.n]
    n_test = max(1, round(settings.heldout * len(order)))  # the first n_test of the shuffled texts

    name, kwargs = source(body)
    tokenizer = load_tokenizer(body)
    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, dtype=torch.float32,
                                                               use_safetensors=True, **kwargs).eval()
    log(f"probe: features of {len(order)} texts from {body.name}")
    X = last_hidden(model, tokenizer, [texts[i] for i in order], settings.batch_size, settings.max_tokens)
    y = np.array([labels[i] for i in order])
    X_train, y_train, X_test, y_test = X[n_test:], y[n_test:], X[:n_test], y[:n_test]
    mean, std = X_train.mean(0), X_train.std(0) + 1e-6
    fit = LogisticRegression(C=settings.C, max_iter=2000).fit((X_train - mean) / std, y_train)
    accuracy = float(fit.score((X_test - mean) / std, y_test))
    log(f"probe: held-out accuracy {accuracy:.3f} on {n_test} texts")

    # Fold the standardization into one line on raw hidden states. The `score` head has no bias:
    # the dropped constant shifts every score alike, which no ranking of beams can see.
    weight = fit.coef_[0] / std
    model.score.weight.data = torch.tensor(weight, dtype=torch.float32)[None]
    model.config.id2label, model.config.label2id = {0: "SCORE"}, {"SCORE": 0}
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {"body": asdict(body), "settings": asdict(settings), "n_train": len(order) - n_test, "n_test": n_test,
              "heldout_accuracy": accuracy, "positive_rate": float(y.mean())}
    (out_dir / REPORT).write_text(json.dumps(report, indent=1))
    return report
