"""Training the guides, built once per key into the cache: sample, label, DPO, token RM, measure, cards.

There is no tuned/untuned pair offline, so we make one from the untuned model itself (ivg/train/pairs.py):
two responses per prompt sampled from it, ordered by the gold reward; DPO tunes it on them (the implicit
value is log pi_tuned - log pi_untuned) and a token reward model learns the same labels. The folder is
`out/<untuned>-<digest of everything that made it>/`; saved models are plain HF causal-LM folders
(safetensors), the token RM's "logits" being its Q values.
"""

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ivg.config import ModelSpec, check
from ivg.eval.config import GoldSpec
from ivg.eval.gold import gold_identity
from ivg.models import LoadedModel, load, load_tokenizer
from ivg.offline.store import build_once, cache_root, digest, is_built
from ivg.train.cards import write_cards
from ivg.train.config import TrainConfig
from ivg.train.dpo import train_dpo
from ivg.train.pairs import Gold, accuracy, encode, label_pairs, pair_values, sample_pairs, split_heldout
from ivg.train.token_rm import train_token_rm

RECIPE_VERSION = 1  # bump when the training recipe changes, so old builds are not taken for new ones


@dataclass(frozen=True)
class GuidePaths:
    """The trained guides as specs the engine loads as they are: Models(base, **paths.models())."""

    tuned: ModelSpec  # folder: DPO-tuned full HF model
    untuned: ModelSpec  # the untuned spec as given (it is not copied)
    explicit: ModelSpec | None  # folder: token reward model, kind token_reward (None: not trained)
    dir: Path  # the cache folder holding both, with ivg-train.json

    def models(self) -> dict:
        return {k: v for k, v in dict(tuned=self.tuned, untuned=self.untuned, explicit=self.explicit).items() if v}


def describe_gold(gold_spec) -> dict:
    """The gold as the build key and the model cards name it: a GoldSpec (with its model's identity), or
    any other name for a gold function given directly (tests, custom scorers)."""
    if isinstance(gold_spec, GoldSpec):
        return {"name": gold_spec.name, "kind": gold_spec.kind, "identity": gold_identity(gold_spec)}
    return {"name": str(gold_spec), "kind": "function", "identity": gold_spec}


def build_key(config: TrainConfig, gold_spec, prompts: list[str]) -> dict:
    """Everything that makes the guides: recipe version, models, the gold (spec and weights), settings and
    the prompts themselves (not `out`)."""
    return {"recipe": "guides", "version": RECIPE_VERSION, "untuned": dataclasses.asdict(config.untuned),
            "explicit_init": dataclasses.asdict(config.explicit_init or config.untuned),
            "gold": describe_gold(gold_spec)["identity"], "settings": dataclasses.asdict(config.settings),
            "prompts": digest(prompts, 64)}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name or name).strip("-")[:48] or "model"


def _paths(config: TrainConfig, folder: Path) -> GuidePaths:
    folder_spec = dict(gguf_file=None, revision=None, trust_remote_code=False)
    return GuidePaths(
        tuned=dataclasses.replace(config.untuned, name=str(folder / "tuned"), **folder_spec),
        untuned=config.untuned,
        explicit=dataclasses.replace(config.explicit_init or config.untuned, name=str(folder / "explicit"),
                                     kind="token_reward", **folder_spec) if config.settings.token_rm else None,
        dir=folder)


def train_guides(config: TrainConfig, prompts: list[str], gold: Gold, gold_spec=None, force: bool = False,
                 log: Callable[[str], None] = print) -> GuidePaths:
    """Sample, label, train both guides, measure them, save: or reuse the build for this key. `gold` scores
    (prompts, responses); `gold_spec` (default config.gold) says which model that is, for the key: a
    GoldSpec, or a name for a gold function of your own."""
    s = config.settings
    gold_spec = gold_spec or config.gold
    check(gold_spec is not None, "train.gold", "needs a gold reward to label the pairs (or set eval.gold)")
    check(len(prompts) >= s.n_prompts, "train.settings.n_prompts",
          f"asks for {s.n_prompts} prompts but only {len(prompts)} were given")
    prompts = list(prompts[:s.n_prompts])
    key = build_key(config, gold_spec, prompts)
    root = Path(config.out).expanduser() if config.out else cache_root() / "guides"
    folder = root / f"{_slug(config.untuned.name)}-{digest(key)}"
    if not force and is_built(folder, key):
        log(f"guides: cached {folder}")
    build_once(folder, key, lambda tmp: _train(config, prompts, gold, gold_spec, tmp, log), force=force)
    return _paths(config, folder)


def _train(config: TrainConfig, prompts: list[str], gold: Gold, gold_spec, tmp: Path, log) -> dict:
    s = config.settings
    start = time.perf_counter()
    timings = {}
    log(f"guides: sampling {s.pairs_per_prompt} pair(s) x {len(prompts)} prompts from {config.untuned.name}")
    pairs = sample_pairs(config.untuned, prompts, s.pairs_per_prompt, s.max_new_tokens, s.temperature, s.seed, s.stop)
    labelled = label_pairs(pairs, gold)
    train, held = split_heldout(labelled, s.heldout, s.seed)
    if not train:
        raise ValueError(f"no usable pairs: the gold ({describe_gold(gold_spec)['name']}) tied or a response was empty in all {len(pairs)}")
    with open(tmp / "pairs.jsonl", "w") as f:
        for split, rows in (("train", train), ("heldout", held)):
            for x in rows:
                f.write(json.dumps({**x, "split": split}) + "\n")
    timings["sample_label_s"] = time.perf_counter() - start
    log(f"guides: {len(labelled)} labelled pairs ({len(pairs) - len(labelled)} dropped), "
        f"{len(train)} train / {len(held)} held out")

    untuned = load(config.untuned)
    rm_init = config.explicit_init or config.untuned
    rm_view = LoadedModel(rm_init, None, load_tokenizer(rm_init))  # its own prompt view and tokenizer
    enc = {"train": encode(untuned, train), "heldout": encode(untuned, held)}
    rm_enc = {"train": encode(rm_view, train), "heldout": encode(rm_view, held)}

    t = time.perf_counter()
    log(f"guides: DPO on {len(train)} pairs ({'LoRA r=%d' % s.lora_r if s.lora_r else 'full'})")
    _, dpo_stats = train_dpo(config.untuned, enc["train"], tmp / "tuned", s, log)
    timings["dpo_s"] = time.perf_counter() - t

    rm_stats = None
    if s.token_rm:
        t = time.perf_counter()
        log(f"guides: token RM on {2 * len(train)} responses")
        _, rm_stats = train_token_rm(rm_init, rm_enc["train"], tmp / "explicit", s, log)
        timings["token_rm_s"] = time.perf_counter() - t

    # Gold accuracy, measured on the saved folders as the engine will load them.
    t = time.perf_counter()
    paths = _paths(config, tmp)
    tuned, rm = load(paths.tuned), (load(paths.explicit) if s.token_rm else None)
    metrics = {}
    for split, rows in enc.items():
        lt, lu = pair_values(tuned.model, rows, "logp"), pair_values(untuned.model, rows, "logp")
        implicit = [(ct - cu, rt - ru) for (ct, rt), (cu, ru) in zip(lt, lu)]
        metrics[split] = {"pairs": len(rows), "implicit_accuracy": accuracy(implicit),
                          "token_rm_accuracy": accuracy(pair_values(rm.model, rm_enc[split], "q")) if rm else None,
                          "implicit_margin": (sum(c - r for c, r in implicit) / len(implicit)) if implicit else None}
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    log(f"guides: gold accuracy {json.dumps(metrics)}")

    record = {"config": dataclasses.asdict(config), "gold": describe_gold(gold_spec), "n_prompts": len(prompts),
              "pairs_sampled": len(pairs), "pairs_labelled": len(labelled), "dpo": dpo_stats,
              "token_rm": rm_stats, "metrics": metrics, "timings": timings}
    write_cards(tmp, record)
    log(f"guides: trained in {timings['total_s']:.0f}s")
    return record
