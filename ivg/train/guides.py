"""Training the guides, built once per key into the cache: sample, label, featurize, DPO, token RM, cards.

There is no tuned/untuned pair offline, so we make one from the untuned model itself:

1. samples   responses sampled from the untuned model to the held-out and training prompts (the
             held-out layout, ivg/train/layout.py), each scored by the gold (cached on its own: a
             change of the DPO or token-RM settings does not sample again)
2. features  one float32 forward of the untuned model over every response (ivg/train/features.py)
3. tuned     DPO on each training prompt's responses ranked by gold, the top layers only (ivg/train/dpo.py)
4. explicit  the token RM: the untuned body + a fitted head (ivg/train/token_rm.py)
5. measured  both values on the held-out pairs, from the features (exact), and the saved folders
             checked to give the same values when loaded as the engine loads them
6. cards     README.md + card.json per guide (ivg/train/cards.py)

The folder is `out/<untuned>-<digest of everything that made it>/`; saved models are plain HF
causal-LM folders (safetensors), the token RM's "logits" being its Q values.
"""

import copy
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ivg.config import ModelSpec, check
from ivg.eval.config import GoldSpec
from ivg.eval.gold import gold_identity
from ivg.models import load, prompt_ids, resolve_device
from ivg.offline.store import build_once, cache_root, digest, is_built
from ivg.train.cards import write_cards
from ivg.train.config import TrainConfig
from ivg.train.dpo import Pair, Ranking, implicit_rewards, pair_accuracy, train_dpo
from ivg.train.features import Features, featurize
from ivg.train.heads import attach_q_head, save_model
from ivg.train.layout import Layout, guide_layout
from ivg.train.pairs import Gold, accuracy, pair_values, sample_pairs, score_responses
from ivg.train.token_rm import Scored, fit_head, q_last

RECIPE_VERSION = 3  # bump when the training recipe changes, so old builds are not taken for new ones
SAMPLES = "samples.jsonl"
CHECKED_PAIRS = 16  # held-out pairs re-measured on the saved folders


@dataclass(frozen=True)
class GuidePaths:
    """The trained guides as specs the engine loads as they are: Models(base, **paths.models())."""

    tuned: ModelSpec  # folder: DPO-tuned full HF model
    untuned: ModelSpec  # the untuned spec as given (it is not copied)
    explicit: ModelSpec | None  # folder: token reward model, kind token_reward (None: not trained)
    dir: Path  # the cache folder holding both, with ivg-build.json

    def models(self) -> dict:
        return {k: v for k, v in dict(tuned=self.tuned, untuned=self.untuned, explicit=self.explicit).items() if v}


def describe_gold(gold_spec) -> dict:
    """The gold as the build key and the model cards name it: a GoldSpec (with its model's identity), or
    any other name for a gold function given directly (tests, custom scorers)."""
    if isinstance(gold_spec, GoldSpec):
        return {"name": gold_spec.name, "kind": gold_spec.kind, "identity": gold_identity(gold_spec)}
    return {"name": str(gold_spec), "kind": "function", "identity": gold_spec}


def sampling_dtype(spec: ModelSpec) -> str:
    """The dtype the engine samples the untuned model in (`auto` depends on the machine): part of the key."""
    from ivg.models import resolve_dtype

    return str(resolve_dtype(spec.dtype, resolve_device(spec.device))).removeprefix("torch.")


def samples_key(config: TrainConfig, gold_spec, layout: Layout) -> dict:
    """Everything the samples depend on: the untuned model (and the dtype it samples in), the gold,
    the sampling settings, and the prompts themselves."""
    return {"recipe": "guide-samples", "version": RECIPE_VERSION, "untuned": dataclasses.asdict(config.untuned),
            "sampling_dtype": sampling_dtype(config.untuned), "gold": describe_gold(gold_spec)["identity"],
            "settings": dataclasses.asdict(config.settings),
            "heldout": digest(list(layout.heldout), 64), "train": digest(list(layout.train), 64)}


def build_key(config: TrainConfig, gold_spec, layout: Layout) -> dict:
    """Everything that makes the guides: the samples' key, the DPO and token-RM settings (not `out`)."""
    return {**samples_key(config, gold_spec, layout), "recipe": "guides",
            "dpo": dataclasses.asdict(config.dpo),
            "token_rm": dataclasses.asdict(config.token_rm) if config.token_rm else None}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name or name).strip("-")[:48] or "model"


def _root(config: TrainConfig) -> Path:
    return Path(config.out).expanduser() if config.out else cache_root() / "guides"


def _paths(config: TrainConfig, folder: Path) -> GuidePaths:
    folder_spec = dict(gguf_file=None, revision=None, trust_remote_code=False)
    return GuidePaths(
        tuned=dataclasses.replace(config.untuned, name=str(folder / "tuned"), **folder_spec),
        untuned=config.untuned,
        explicit=dataclasses.replace(config.untuned, name=str(folder / "explicit"), kind="token_reward",
                                     **folder_spec) if config.token_rm else None,
        dir=folder)


def train_guides(config: TrainConfig, guide_prompts: list[str], gold: Gold, gold_spec=None,
                 evaluated: list[str] = (), force: bool = False, log: Callable[[str], None] = print) -> GuidePaths:
    """Sample, label, train both guides, measure them, save: or reuse the build for this key.

    `guide_prompts`: the prompts after the evaluated ones (held-out first, then training; the layout);
    `evaluated`: the evaluation prompts, which no training prompt may repeat. `gold` scores
    (prompts, responses); `gold_spec` (default config.gold) says which model that is, for the key: a
    GoldSpec, or a name for a gold function of your own."""
    s = config.settings
    gold_spec = gold_spec or config.gold
    check(gold_spec is not None, "train.gold", "needs a gold reward to label the pairs (or set eval.gold)")
    layout = guide_layout(list(guide_prompts), list(evaluated), s.heldout_prompts, s.n_prompts)
    key = build_key(config, gold_spec, layout)
    folder = _root(config) / f"{_slug(config.untuned.name)}-{digest(key)}"
    if not force and is_built(folder, key):
        log(f"guides: cached {folder}")
    build_once(folder, key, lambda tmp: _train(config, layout, gold, gold_spec, tmp, log, force), force=force)
    return _paths(config, folder)


def ensure_samples(config: TrainConfig, layout: Layout, gold: Gold, gold_spec, log, force: bool = False) -> Path:
    """samples.jsonl (one row per response: split, prompt index, pair, side, prompt, response, gold),
    built once per samples key."""
    key = samples_key(config, gold_spec, layout)
    folder = _root(config) / f"samples-{digest(key)}"
    if not force and is_built(folder, key):
        log(f"guides: cached samples {folder}")
        return folder / SAMPLES
    s = config.settings

    def build(tmp: Path) -> dict:
        start, rows = time.perf_counter(), []
        # (split, prompts, pairs per prompt); the held-out prompts on their own random streams (tag)
        for split, prompts, n_pairs in (("heldout", layout.heldout, 1), ("train", layout.train, s.responses // 2)):
            if not prompts:
                continue
            log(f"guides: sampling {n_pairs} pair(s) x {len(prompts)} {split} prompts from {config.untuned.name}")
            pairs = sample_pairs(config.untuned, list(prompts), n_pairs, s.max_new_tokens, s.temperature, s.seed,
                                 s.stop, batch=s.batch, tag=split)
            for n, scored in enumerate(score_responses(pairs, gold)):
                pair = n // 2
                rows.append({"split": split, "i": pair // n_pairs, "pair": pair % n_pairs, "side": "ab"[n % 2], **scored})
        with open(tmp / SAMPLES, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return {"responses": len(rows), "seconds": round(time.perf_counter() - start, 1)}

    build_once(folder, key, build, force=force)
    return folder / SAMPLES


def _train(config: TrainConfig, layout: Layout, gold: Gold, gold_spec, tmp: Path, log, force: bool) -> dict:
    s, d = config.settings, config.dpo
    start, timings = time.perf_counter(), {}
    samples = [json.loads(line) for line in open(ensure_samples(config, layout, gold, gold_spec, log, force))]
    (tmp / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in samples))
    timings["samples_s"] = time.perf_counter() - start

    # 2. features of every non-empty response, token ids as the engine feeds them
    t = time.perf_counter()
    untuned = load(dataclasses.replace(config.untuned, dtype="float32"))  # train in float32 whatever it decodes in
    full, tok = untuned.model, untuned.tokenizer
    kept = [r for r in samples if r["response"]]
    prompt_view = {p: prompt_ids(untuned, p) for p in {r["prompt"] for r in kept}}
    examples = [(prompt_view[r["prompt"]], tok(r["response"], add_special_tokens=False).input_ids) for r in kept]
    kept, examples = zip(*[(r, e) for r, e in zip(kept, examples) if e[1]]) if examples else ((), ())
    cut = None if d.layers is None else full.config.num_hidden_layers - d.layers
    log(f"guides: features of {len(kept)} responses (float32{'' if cut is None else f', layer {cut} states'})")
    feats = featurize(full, list(examples), cut=cut, batch=max(1, s.batch // 4), log=log)
    by = {(r["split"], r["i"], r["pair"], r["side"]): Scored(f, r["gold"]) for r, f in zip(kept, feats)}
    timings["features_s"] = time.perf_counter() - t

    heldout = pairs_of(by, "heldout", range(len(layout.heldout)))
    check(len(heldout) > 0, "train.settings.heldout_prompts", "no held-out pair is usable (all ties or empty)")
    n_val = d.val_prompts
    check(n_val < s.n_prompts, "train.dpo.val_prompts", f"must be < n_prompts ({s.n_prompts})")
    groups = [[by[k] for k in group_keys(i, s.responses) if k in by] for i in range(s.n_prompts)]
    fit, val = groups[:s.n_prompts - n_val], groups[s.n_prompts - n_val:]
    rankings = [r for r in map(ranking_of, fit) if r]
    val_pairs = [p for g in val for p in pairs_within(g)]
    check(len(rankings) > 0, "train.settings.n_prompts", "no training prompt has two responses the gold orders")
    metrics = {"heldout_pairs": len(heldout), "dpo_prompts": len(rankings),
               "dpo_responses": sum(len(r.responses) for r in rankings), "val_pairs": len(val_pairs)}

    # 3. DPO -> the tuned model
    t = time.perf_counter()
    log(f"guides: DPO on {metrics['dpo_responses']} ranked responses to {len(rankings)} prompts "
        f"({'top %d layers' % d.layers if d.layers else 'every layer'}), {len(val_pairs)} validation pairs")
    policy, dpo_stats = train_dpo(full, rankings, val_pairs, d, log)
    train_pairs = pairs_of(by, "train", range(s.n_prompts - n_val))[:len(heldout)]
    metrics["implicit"] = {"heldout": pair_accuracy(implicit_rewards(policy, heldout)),
                           "train": pair_accuracy(implicit_rewards(policy, train_pairs)),
                           "validation": dpo_stats["kept_val_accuracy"]}
    checked = heldout[:CHECKED_PAIRS]
    implicit_checked = implicit_rewards(policy, checked)
    save_model(policy.merged_into(copy.deepcopy(full)), tok, tmp / "tuned")
    timings["dpo_s"] = time.perf_counter() - t
    del policy

    # 4. the token RM
    rm_stats = None
    if config.token_rm is not None:
        t = time.perf_counter()
        log(f"guides: token RM head on {sum(map(len, groups))} responses to {len(groups)} prompts")
        W, rm_stats = fit_head(groups, full.config.vocab_size, config.token_rm, log)
        rm = copy.deepcopy(full)
        with torch.no_grad():
            attach_q_head(rm).weight.copy_(torch.from_numpy(W))
        save_model(rm, tok, tmp / "explicit")
        del rm
        Wt = torch.from_numpy(W)
        rm_train = [(q_last(Wt, p.chosen), q_last(Wt, p.rejected)) for p in pairs_of(by, "train", range(s.n_prompts))]
        metrics["token_rm"] = {"heldout": accuracy([(q_last(Wt, p.chosen), q_last(Wt, p.rejected)) for p in heldout]),
                               "train": accuracy(rm_train)}
        timings["token_rm_s"] = time.perf_counter() - t

    # 5. the saved folders, loaded as the engine loads them, give the same values
    t = time.perf_counter()
    metrics["checked"] = check_saved(config, tmp, checked, full, implicit_checked,
                                     Wt if config.token_rm is not None else None)
    timings["check_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    log(f"guides: held-out accuracy (n={len(heldout)}) implicit {metrics['implicit']['heldout']:.3f}"
        + (f", token RM {metrics['token_rm']['heldout']:.3f}" if rm_stats else ""))

    record = {"config": dataclasses.asdict(config), "gold": describe_gold(gold_spec),
              "prompts": {"heldout": len(layout.heldout), "train": len(layout.train)},
              "responses": len(samples), "usable_responses": len(kept), "dpo": dpo_stats, "token_rm": rm_stats,
              "metrics": metrics, "timings": {k: round(v, 1) for k, v in timings.items()}}
    write_cards(tmp, record)
    log(f"guides: trained in {timings['total_s']:.0f}s")
    return record


def group_keys(i: int, responses: int) -> list[tuple]:
    return [("train", i, j // 2, "ab"[j % 2]) for j in range(responses)]


def ranking_of(group: list[Scored]) -> Ranking | None:
    """A prompt's responses best first by gold; one repeating a better one's gold or tokens is left out
    (a tie orders nothing); None if fewer than two remain."""
    kept = []
    for x in sorted(group, key=lambda x: -x.gold):
        if all(x.gold != y.gold and x.features.response_ids != y.features.response_ids for y in kept):
            kept.append(x)
    return Ranking([x.features for x in kept]) if len(kept) >= 2 else None


def pairs_within(group: list[Scored]) -> list[Pair]:
    """Every pair of a prompt's responses the gold orders (ties and identical responses left out)."""
    ranking = ranking_of(group)
    if ranking is None:
        return []
    gold = {id(x.features): x.gold for x in group}
    r = ranking.responses
    return [Pair(a, b, gold[id(a)] - gold[id(b)]) for i, a in enumerate(r) for b in r[i + 1:]]


def pairs_of(by: dict, split: str, prompts) -> list[Pair]:
    """The first sampled pair of each prompt, ordered by gold; ties, empty and identical responses dropped."""
    out = []
    for i in prompts:
        a, b = by.get((split, i, 0, "a")), by.get((split, i, 0, "b"))
        if a is None or b is None or a.gold == b.gold or a.features.response_ids == b.features.response_ids:
            continue
        chosen, rejected = (a, b) if a.gold > b.gold else (b, a)
        out.append(Pair(chosen.features, rejected.features, chosen.gold - rejected.gold))
    return out


def check_saved(config: TrainConfig, folder: Path, pairs: list[Pair], full, implicit, W) -> dict:
    """The saved guides on a few held-out pairs, loaded as the engine loads them (in float32), against
    the values measured from the features: the largest difference of each value."""
    paths = _paths(config, folder)
    enc = [{"prompt_ids": p.chosen.prompt_ids, "chosen_ids": p.chosen.response_ids,
            "rejected_ids": p.rejected.response_ids} for p in pairs]
    f32 = lambda spec: load(dataclasses.replace(spec, dtype="float32")).model
    lt, lu = pair_values(f32(paths.tuned), enc, "logp"), pair_values(full, enc, "logp")
    out = {"pairs": len(pairs), "implicit_gap": max_gap([(ct - cu, rt - ru) for (ct, rt), (cu, ru) in zip(lt, lu)], implicit)}
    if W is not None:
        q = pair_values(f32(paths.explicit), enc, "q")
        out["token_rm_gap"] = max_gap(q, [(q_last(W, p.chosen), q_last(W, p.rejected)) for p in pairs])
    return out


def max_gap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    return float(max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))) if a else 0.0
