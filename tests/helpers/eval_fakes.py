"""Tiny stand-ins for the evaluation tests: a MiniLM-like BERT, classifiers, a reward model, snippet data, a run dir.

Everything is random and built in milliseconds; nothing touches the network.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, models
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

GOOD = ["great", "wonderful", "superb", "moving", "brilliant", "delightful"]
BAD = ["awful", "boring", "dull", "terrible", "clumsy", "tedious"]
FILLER = ["the", "film", "movie", "plot", "was", "a", "and", "acting", "story", "very", "quite", "ending"]
WORDS = GOOD + BAD + FILLER


def bert_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})


def bert_config(vocab_size: int, **kw) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, **kw,
    )


def tiny_encoder(folder: Path) -> Path:
    """A MiniLM-shaped HF folder (BertModel + tokenizer), random weights."""
    tok = bert_tokenizer(folder)
    torch.manual_seed(0)
    model = BertModel(bert_config(len(tok)))
    with torch.no_grad():  # attention off: each state encodes its own word, so mean pooling is a bag of words
        for layer in model.encoder.layer:
            layer.attention.output.dense.weight.zero_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_classifier(folder: Path) -> Path:
    """A 3-label sequence classifier (labels NEGATIVE, NEUTRAL, POSITIVE), like distilbert-imdb with one more."""
    tok = bert_tokenizer(folder)
    torch.manual_seed(1)
    labels = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}
    cfg = bert_config(len(tok), num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_reward_model(folder: Path) -> Path:
    """A GPT-2 reward model (num_labels=1), character tokenizer with no pad token, like real decoder RMs."""
    chars = [chr(c) for c in range(32, 127)]
    vocab = {c: i for i, c in enumerate(["<eos>", "<unk>", *chars])}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        eos_token="<eos>", unk_token="<unk>",
    )
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=256, num_labels=1)
    GPT2ForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def snippets(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Rated snippets whose sentiment is carried by a few words, so even a random encoder separates them."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(i % 2)
        words = list(rng.choice(FILLER, 5)) + list(rng.choice(GOOD if label else BAD, 2))
        rng.shuffle(words)
        rows.append({"id": f"s{i}", "text": " ".join(words), "rating": (2.0 if label else -2.0), "label": label})
    pd.DataFrame(rows).to_parquet(path)
    return path


def generate_rows(methods=("base", "ivg"), n: int = 6, failed: int = 1, with_reference: bool = False) -> pd.DataFrame:
    """Output rows in the DESIGN.md schema; the first `failed` rows of each method failed."""
    rng = np.random.default_rng(0)
    rows = []
    for m, method in enumerate(methods):
        for i in range(n):
            ok = i >= failed
            resp = " ".join(rng.choice(WORDS, 3 + m + i % 3)) if ok else ""
            row = {
                "id": f"p{i}", "prompt": f"the film {WORDS[i % len(WORDS)]}", "response": resp, "method": method,
                "W": 4, "K": 4, "L": 5, "beta_token": 1.0, "beta_chunk": 1.0, "seed": 0,
                "n_new_tokens": len(resp.split()), "model_tokens": {"base": 100 * (m + 1) + i, "tuned": 50 + i},
                "wall_s": 0.5 + 0.1 * i, "chunk_scores": [0.1 * i, 0.2], "status": "ok" if ok else "failed",
                "error": None if ok else "OOM at step 3",
            }
            if with_reference:
                row["reference"] = " ".join(rng.choice(WORDS, 4))
                row["alpaca_index"] = i
            rows.append(row)
    return pd.DataFrame(rows)


def write_run(run_dir: Path, df: pd.DataFrame, shards: int = 2) -> Path:
    (run_dir / "shards").mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(np.array_split(np.arange(len(df)), shards)):
        df.iloc[part].to_parquet(run_dir / "shards" / f"shard-{s:05d}.parquet")
    return run_dir


def glm_inputs(folder: Path, n: int = 40, seed: int = 0) -> Path:
    """Synthetic inputs of alpaca_eval's LC GLM, in the layout of the hub files (two gamed baselines)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 0.5, n)
    pd.DataFrame({"index": range(n), "instruction_difficulty": difficulty}).to_csv(
        folder / "instruction_difficulty.csv", index=False
    )
    gamed = []
    for model, sign in (("verbose", -1), ("concise", 1)):
        delta = sign * np.abs(rng.normal(1.0, 0.5, n))
        pref = 1 / (1 + np.exp(-(-math.tanh(1) * delta + difficulty)))
        gamed.append(pd.DataFrame({
            "model": model, "index": range(n), "preference": pref, "std_delta_len": delta,
            "instruction_difficulty": difficulty, "not_gamed_baseline": False,
        }))
    pd.concat(gamed).to_csv(folder / "df_gamed.csv", index=False)
    return folder
