"""Gold reward scorers: the judges of generated text, kept apart from the values that guide decoding.

One class, `GoldScorer(spec).score(prompts, responses) -> list[float]`, covers four kinds:
  classifier         any HF sequence classifier; score = logit[positive_label] - logit[negative_label]
                     (the paper's sentiment gold: lvwerra/distilbert-imdb, POSITIVE - NEGATIVE).
  scalar             any HF reward model with num_labels=1; score = its single logit.
  offline_sentiment  a classifier built here from the MiniLM encoder + the rated movie-review snippets
                     (assets `minilm`, `movie-snippets`), the offline stand-in for distilbert-imdb.
  vader              VADER's compound score in [-1, 1]: no model, a second opinion.
The text each scorer sees is `spec.format.format(prompt=..., response=...)`, e.g. "{prompt}TL;DR: {response}".

The offline sentiment model is a linear head (logistic regression) on mean-pooled encoder states. A linear map
commutes with the mean, so `w · mean_t(h_t) + b == mean_t(w · h_t + b)`: the head is saved as an HF
*token* classifier and the scorer averages its per-token logits over the attention mask. That keeps it an
ordinary HF folder (safetensors, no remote code) that the same classifier code loads.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from ivg.eval.config import GoldSpec
from ivg.files import sha256_file
from ivg.models import resolve_name
from ivg.offline.store import build_once, cache_root, marker

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLINE_REPORT = "gold_report.json"  # training numbers, saved beside the offline model's weights
OFFLINE_VERSION = 1  # bump when build_offline_sentiment changes what it fits


class GoldScorer:
    """Loads the gold model once; `score` is a plain method a Ray actor can wrap."""

    def __init__(self, spec: GoldSpec):
        spec.validate("gold")
        self.spec = spec
        if spec.kind == "vader":
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self.vader = SentimentIntensityAnalyzer()
            return
        path = offline_model(spec.name) if spec.kind == "offline_sentiment" else resolve_name(spec.name)
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision)
        self.model = _load_classifier(path, DTYPES[spec.dtype], spec.revision).to(spec.device).eval()
        if self.tokenizer.pad_token is None:  # decoder reward models (GPT-2, Llama) often ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # *ForSequenceClassification finds the last token by it
        self.pick = self._head_reader()

    def _head_reader(self):
        """(B, C) logits -> (B,) scores, checked against the model's labels once, here."""
        n, spec = self.model.config.num_labels, self.spec
        if spec.kind == "scalar":
            if n != 1:
                raise ValueError(f"GoldSpec.kind='scalar' needs a num_labels=1 model; {spec.name} has {n} labels")
            return lambda logits: logits[:, 0]
        label2id = {label: int(i) for i, label in self.model.config.id2label.items()}
        for field in ("positive_label", "negative_label"):
            if getattr(spec, field) not in label2id:
                raise ValueError(f"GoldSpec.{field}={getattr(spec, field)!r} is not a label of {spec.name}: {sorted(label2id)}")
        pos, neg = label2id[spec.positive_label], label2id[spec.negative_label]
        return lambda logits: logits[:, pos] - logits[:, neg]

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        texts = [self.spec.format.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        if self.spec.kind == "vader":
            return [float(self.vader.polarity_scores(t)["compound"]) for t in texts]
        out = []
        for i in range(0, len(texts), self.spec.batch_size):
            out.extend(self._score_batch(texts[i : i + self.spec.batch_size]))
        return out

    @torch.no_grad()
    def _score_batch(self, texts: list[str]) -> list[float]:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="pt"
        ).to(self.spec.device)
        logits = self.model(**batch).logits.float()
        if logits.dim() == 3:  # token classifier (B, T, C): mean over real tokens, see the module docstring
            logits = masked_mean(logits, batch["attention_mask"])
        return self.pick(logits).tolist()


def gold_identity(spec: GoldSpec) -> dict:
    """What a gold score depends on, as data: the spec's fields that change a score and the model's own
    identity (its weights' build key or content hashes, a hub revision, or the VADER version). Two
    scores with equal identities are interchangeable; `device` and `batch_size` only change how fast
    they are computed. Computed without loading (or downloading) the model."""
    fields = {k: v for k, v in asdict(spec).items() if k not in ("device", "batch_size")}
    if spec.kind == "vader":
        import importlib.metadata

        model = {"vaderSentiment": importlib.metadata.version("vaderSentiment")}
    elif spec.kind == "offline_sentiment":
        folder = offline_dir(spec.name)
        built = marker(folder)
        model = built["key"] if built else OfflineSentimentRecipe().key()
    else:
        name = resolve_name(spec.name)
        model = input_identity(name) if Path(name).exists() else hub_identity(name, spec.revision)
    return {"spec": fields, "model": model}


def scorer_id(identity: dict) -> str:
    """A short name for a scorer identity: what the `<column>_scorer` columns of evaluated rows hold."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hub_identity(repo: str, revision: str | None) -> dict:
    """A hub model: the revision asked for, else the commit the local HF cache holds (no network).
    None means nothing pins it yet: the first scoring downloads it, and the next run records its commit."""
    from huggingface_hub import try_to_load_from_cache

    commit = revision
    if commit is None:
        try:
            cached = try_to_load_from_cache(repo, "config.json")
        except Exception:  # not a valid repo id: it cannot have been scored either
            cached = None
        if isinstance(cached, str):  # <cache>/models--org--name/snapshots/<commit>/config.json
            commit = Path(cached).parent.name
    return {"hub": repo, "revision": commit}


def _load_classifier(path, dtype, revision=None):
    archs = AutoConfig.from_pretrained(path, revision=revision).architectures or []
    auto = AutoModelForTokenClassification if any(a.endswith("ForTokenClassification") for a in archs) else AutoModelForSequenceClassification
    return auto.from_pretrained(path, dtype=dtype, revision=revision)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D): mean over positions where mask is 1 (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# The offline sentiment gold model: MiniLM encoder + logistic regression on the rated movie-review snippets.


def offline_dir(name: str) -> Path:
    """'auto' -> the ivg cache ($IVG_CACHE, else ~/.cache/ivg)/gold/offline-sentiment; else the folder named."""
    return cache_root() / "gold" / "offline-sentiment" if name == "auto" else Path(name)


@dataclass(frozen=True)
class OfflineSentimentRecipe:
    """Everything that decides the offline gold model; its key names the build (a change rebuilds)."""

    encoder: str = "asset:minilm"  # an HF encoder folder (or asset)
    snippets: str = "asset:movie-snippets"  # Parquet with text, label (0/1)
    test_fraction: float = 0.2
    seed: int = 0
    C: float = 0.1  # mild L2: the 384-d MiniLM features overfit 8k snippets a little at C=1
    max_length: int = 128
    batch_size: int = 64  # embedding batches: speed only, so not in the key

    def key(self) -> dict:
        facts = {k: v for k, v in asdict(self).items() if k != "batch_size"}
        return {"recipe": "offline-sentiment", "version": OFFLINE_VERSION, **facts,
                "encoder": input_identity(self.encoder), "snippets": input_identity(self.snippets)}


def input_identity(name: str):
    """What an input of a build (or a gold model) is: an asset's pins (known without fetching it), a
    built folder's own key, else a file's sha256 or a folder's files with their sha256."""
    if name.startswith("asset:"):
        from ivg.offline.assets import ASSETS

        asset = ASSETS.get(name.removeprefix("asset:"))
        if asset is not None:
            return asset.key
    path = Path(name)
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    built = marker(path) if path.is_dir() else None
    if built is not None:
        return built["key"]
    # content, not sizes: a model retrained into the same folder keeps every file's size
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return {"path": str(path), "files": [[str(p.relative_to(path)), sha256_file(p)] for p in files]}


def offline_model(name: str) -> Path:
    """The offline sentiment model a GoldSpec names: "auto" is the default recipe's build in the cache
    (built now if missing or made by another recipe); a folder is taken as built, whatever its recipe
    (its marker records which: gold_identity reads it), and built with the default recipe if empty."""
    folder = offline_dir(name)
    if name != "auto" and marker(folder) is not None:
        return folder
    return ensure_offline_sentiment(folder)


def ensure_offline_sentiment(out_dir: Path, recipe: OfflineSentimentRecipe = OfflineSentimentRecipe()) -> Path:
    """The trained folder for `recipe`, built first if it is not there (assets resolved only then)."""
    return build_once(Path(out_dir), recipe.key(), lambda tmp: build_offline_sentiment(recipe, tmp))


def build_offline_sentiment(recipe: OfflineSentimentRecipe, out_dir: Path) -> dict:
    """Train the head into `out_dir` (an empty folder); return (and save) the held-out report."""
    from sklearn.linear_model import LogisticRegression

    t0 = time.time()
    encoder_dir, snippets = resolve_name(recipe.encoder), resolve_name(recipe.snippets)
    df = read_snippets(snippets)
    rng = np.random.default_rng(recipe.seed)
    is_test = np.zeros(len(df), dtype=bool)
    is_test[rng.permutation(len(df))[: max(1, int(len(df) * recipe.test_fraction))]] = True

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    encoder = AutoModel.from_pretrained(encoder_dir, dtype=torch.float32).eval()
    x = embed(encoder, tokenizer, df["text"].tolist(), recipe.batch_size, recipe.max_length)  # (N, H)
    y = df["label"].to_numpy()
    head = LogisticRegression(C=recipe.C, max_iter=2000).fit(x[~is_test], y[~is_test])
    accuracy = float(head.score(x[is_test], y[is_test]))

    # Two labels whose logit difference is the regression's decision function: POSITIVE - NEGATIVE = w·x + b.
    model = AutoModelForTokenClassification.from_pretrained(
        encoder_dir, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}
    )
    w, b = torch.tensor(head.coef_[0], dtype=torch.float32), torch.tensor(head.intercept_[0], dtype=torch.float32)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.stack([-w, w]) / 2)
        model.classifier.bias.copy_(torch.stack([-b, b]) / 2)
    report = {
        "accuracy": accuracy,
        "vader_accuracy": vader_accuracy(df["text"][is_test].tolist(), y[is_test]),
        "n_train": int((~is_test).sum()),
        "n_test": int(is_test.sum()),
        "train_seconds": time.time() - t0,
        "recipe": asdict(recipe),
    }
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / OFFLINE_REPORT).write_text(json.dumps(report, indent=2))
    return report


def read_snippets(path) -> pd.DataFrame:
    df = pd.read_parquet(path)
    missing = {"text", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: snippets need columns text, label; missing {sorted(missing)}")
    bad = ~df["label"].isin([0, 1])
    if bad.any():
        raise ValueError(f"{path}: label must be 0/1; row {int(np.flatnonzero(bad)[0])} has {df['label'][bad].iloc[0]!r}")
    return df.reset_index(drop=True)


@torch.no_grad()
def embed(encoder, tokenizer, texts: list[str], batch_size: int, max_length: int) -> np.ndarray:
    """Mean-pooled last hidden states, (N, H). Batches are cut by length to waste little on padding."""
    from tqdm import tqdm  # a dependency of transformers

    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    # a live bar on a terminal (minutes under load), nothing in logs
    for i in tqdm(range(0, len(texts), batch_size), desc="[gold] embedding snippets", unit="batch", disable=None):
        idx = order[i : i + batch_size]
        batch = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out[idx] = masked_mean(encoder(**batch).last_hidden_state, batch["attention_mask"]).numpy()
    return out


def vader_accuracy(texts: list[str], labels: np.ndarray) -> float:
    """VADER as a second opinion: compound > 0 means positive."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    pred = np.array([vader.polarity_scores(t)["compound"] > 0 for t in texts])
    return float((pred == np.asarray(labels).astype(bool)).mean())
