"""A reward probe: a frozen causal LM body and a linear head fitted to labelled texts.

The cheapest explicit value that reads text the way the base does: one forward pass over labelled
texts (e.g. human-rated movie reviews), a logistic regression on each text's last-token hidden state,
saved as an ordinary HF sequence classifier (num_labels=1) whose `score` head is the fitted line. The
engine then scores prefixes incrementally (ExplicitRole, kind classifier): a chunk costs its new tokens.
"""

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForSequenceClassification

from ivg.config import ModelSpec, check
from ivg.models import load_tokenizer, source

MARKER = "probe.json"  # written last: a folder without it is not a finished probe


@dataclass(frozen=True)
class ProbeSettings:
    n: int = 2000  # labelled texts used (train + held out)
    heldout: float = 0.2
    C: float = 1.0  # inverse L2 strength of the logistic regression
    batch_size: int = 32
    max_tokens: int = 64  # texts are cut to their first tokens, like the short prefixes scored at decode time
    seed: int = 0

    def __post_init__(self):
        check(self.n >= 10, "probe.n", "must be >= 10")
        check(0 < self.heldout < 1, "probe.heldout", "must be in (0, 1)")
        check(self.C > 0, "probe.C", "must be > 0")
        check(self.batch_size >= 1 and self.max_tokens >= 2, "probe.batch_size", "batch_size >= 1, max_tokens >= 2")


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


def train_probe(body: ModelSpec, texts: list[str], labels: list[int], out_dir, settings: ProbeSettings,
                log=print) -> ModelSpec:
    """Fit, measure on held-out texts, save as an HF sequence classifier; returns its ModelSpec."""
    out_dir = Path(out_dir).expanduser()
    spec = ModelSpec(str(out_dir), kind="classifier", template=body.template)
    if (out_dir / MARKER).is_file():
        log(f"probe: cached {out_dir}")
        return spec
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
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    report = {"body": asdict(body), "settings": asdict(settings), "n_train": len(order) - n_test, "n_test": n_test,
              "heldout_accuracy": accuracy, "positive_rate": float(y.mean())}
    (tmp / MARKER).write_text(json.dumps(report, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return spec
