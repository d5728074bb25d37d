"""Training the guides: a DPO-tuned LM (implicit value against its untuned start) and a token reward model.

There is no tuned/untuned pair offline, so we make one from the untuned model itself:
  sample_pairs     two responses per prompt from the untuned model (the engine's plain sampling)
  label_pairs      the gold reward orders each pair: chosen, rejected, margin (ties dropped)
  train_dpo        TRL DPO (LoRA merged back, or full) -> tuned; the implicit value is log pi_t - log pi_u
  train_token_rm   the same labels, FUDGE-style: Q(s_<t, a_t) = logit P(this response is the chosen one)
  train_guides     all of it, cached under out/<untuned>-<hash of everything that made it>/

Both trainers see exactly the token ids the engine feeds at decode time: the prompt as the model's own
view (`ivg.models.prompt_ids`: its template, its special tokens) followed by the response tokenized
alone, no EOS appended (the implicit value sums over response tokens; the search scores prefixes).
Saved models are plain HF causal-LM folders (safetensors); the token RM's "logits" are its Q values.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ivg.assets import cache_root
from ivg.config import DecodeConfig, GenerationConfig, MethodConfig, ModelSpec, Models, check
from ivg.engine import Engine
from ivg.models import LoadedModel, load, load_tokenizer, prompt_ids

CACHE_VERSION = 1  # bump when the training recipe changes, so old caches are not taken for new ones
MARKER = "ivg-train.json"  # written last: a folder without it is not a finished run

Gold = Callable[[list[str], list[str]], list[float]]  # (prompts, responses) -> scores


@dataclass(frozen=True)
class TrainSettings:
    n_prompts: int = 128  # the first n prompts are used
    pairs_per_prompt: int = 1
    max_new_tokens: int = 40
    temperature: float = 1.0  # sampling the pairs: 1.0 = the untuned policy itself
    stop: tuple[str, ...] = ()  # stop strings for the sampled responses, e.g. ("\n",) as at decode time
    heldout: float = 0.2  # fraction of prompts held out to measure gold accuracy
    beta: float = 0.1  # DPO beta
    lr: float = 5e-4  # DPO learning rate (LoRA; use ~5e-6 for full fine-tuning)
    rm_lr: float = 1e-4  # token RM learning rate (AdamW; 1e-3 made the SmolLM2 loss climb)
    epochs: int = 1
    batch_size: int = 8  # pairs per step (DPO) / sequences per step (token RM)
    lora_r: int | None = 16  # None = full fine-tuning
    lora_alpha: int = 32
    seed: int = 0
    token_rm: bool = True  # False: train only the DPO guide (the explicit value comes from elsewhere)

    def __post_init__(self):
        w = "train.settings"
        for name in ("n_prompts", "pairs_per_prompt", "max_new_tokens", "epochs", "batch_size", "lora_alpha"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{w}.{name}", "must be an integer >= 1")
        check(self.lora_r is None or self.lora_r >= 1, f"{w}.lora_r", "must be >= 1, or null for full fine-tuning")
        check(self.temperature > 0, f"{w}.temperature", "must be > 0: a pair of greedy samples is one response twice")
        check(0 <= self.heldout < 1, f"{w}.heldout", "must be in [0, 1)")
        for name in ("beta", "lr", "rm_lr"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, f"{w}.{name}", "must be a positive number")
        check(all(isinstance(s, str) and s for s in self.stop), f"{w}.stop", "must be a list of non-empty strings")


@dataclass(frozen=True)
class GuideConfig:
    untuned: ModelSpec  # the policy the pairs are sampled from, DPO's start and reference
    gold: str  # names the gold function (cache key, model card), e.g. "vader" or a GoldSpec as JSON
    out: str | None = None  # None: <ivg cache>/guides ($IVG_CACHE, else ~/.cache/ivg)
    explicit_init: ModelSpec | None = None  # the token RM's body; None = the untuned model
    settings: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self):
        self.untuned.validate("train.untuned")
        check(self.untuned.kind == "causal_lm", "train.untuned.kind", "must be causal_lm")
        if self.explicit_init is not None:
            self.explicit_init.validate("train.explicit_init")
        check(bool(self.gold), "train.gold", "must name the gold reward")


@dataclass(frozen=True)
class GuidePaths:
    """The trained guides as specs the engine loads as they are: Models(base, **paths.models())."""

    tuned: ModelSpec  # folder: DPO-tuned full HF model
    untuned: ModelSpec  # the untuned spec as given (it is not copied)
    explicit: ModelSpec | None  # folder: token reward model, kind token_reward (None: not trained)
    dir: Path  # the cache folder holding both, with ivg-train.json

    def models(self) -> dict:
        return {k: v for k, v in dict(tuned=self.tuned, untuned=self.untuned, explicit=self.explicit).items() if v}


# ---------------------------------------------------------------------------------------------- data


def sample_pairs(untuned: ModelSpec, prompts: list[str], n_pairs: int, max_new_tokens: int,
                 temperature: float, seed: int, stop: tuple[str, ...] = (), batch: int = 64) -> list[dict]:
    """n_pairs pairs of responses per prompt, plain sampling from the untuned model.

    The engine seeds each row from (seed, row id), so a pair is the same whatever the batch it runs in."""
    config = GenerationConfig(models=Models(base=untuned), seed=seed,
                              decode=DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop))
    engine = Engine.local(config)
    rows = [{"id": f"{i}/{j}/{side}", "prompt": p}
            for i, p in enumerate(prompts) for j in range(n_pairs) for side in "ab"]
    out = []
    for start in range(0, len(rows), batch):
        out += engine.run(rows[start:start + batch], MethodConfig())
    failed = [r for r in out if r["status"] != "ok"]
    if failed:
        raise ValueError(f"{len(failed)} sampling rows failed, first: {failed[0]['id']}: {failed[0]['error']}")
    return [{"prompt": a["prompt"], "a": a["response"], "b": b["response"]} for a, b in zip(out[::2], out[1::2])]


def label_pairs(pairs: list[dict], gold: Gold) -> list[dict]:
    """Order each pair by the gold reward. A tie teaches nothing and an empty response gives the token RM
    no prefix to score, so those pairs are dropped."""
    prompts = [p["prompt"] for p in pairs]
    scores = gold(prompts + prompts, [p["a"] for p in pairs] + [p["b"] for p in pairs])
    if len(scores) != 2 * len(pairs):
        raise ValueError(f"the gold returned {len(scores)} scores for {2 * len(pairs)} responses")
    out = []
    for p, sa, sb in zip(pairs, scores[:len(pairs)], scores[len(pairs):]):
        if sa == sb or not p["a"] or not p["b"]:
            continue
        chosen, rejected = (p["a"], p["b"]) if sa > sb else (p["b"], p["a"])
        out.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "margin": abs(sa - sb)})
    return out


def encode(loaded, labelled: list[dict]) -> list[dict]:
    """Token ids as the engine feeds them: the model's prompt view, then the response alone."""
    tok = loaded.tokenizer
    return [{"prompt_ids": prompt_ids(loaded, x["prompt"]),
             "chosen_ids": tok(x["chosen"], add_special_tokens=False).input_ids,
             "rejected_ids": tok(x["rejected"], add_special_tokens=False).input_ids} for x in labelled]


def response_scores(model, examples: list[tuple[list[int], list[int]]], log_probs: bool):
    """Per example (prompt ids, response ids): each response token's entry in the output just before it,
    log pi(a_t | s_<t) if log_probs else the raw output (the token RM's Q(s_<t, a_t)).

    Returns (B, T-1) scores and a (B, T-1) mask of the response positions; right-padded, so positions
    need no adjusting."""
    device = next(model.parameters()).device
    seqs = [p + r for p, r in examples]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    resp = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for i, ((p, r), s) in enumerate(zip(examples, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        resp[i, len(p) - 1:len(s) - 1] = True  # output t predicts token t + 1
    ids, mask, resp = ids.to(device), mask.to(device), resp.to(device)
    out = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    if log_probs:
        out = out.log_softmax(-1)
    return out[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), resp


@torch.inference_mode()
def pair_values(model, encoded: list[dict], kind: str, batch: int = 16) -> list[tuple[float, float]]:
    """(chosen, rejected) per pair: kind "logp" = sum of response log-probs, "q" = Q of the last token."""
    out = []
    for start in range(0, len(encoded), batch):
        rows = encoded[start:start + batch]
        examples = [(x["prompt_ids"], x[side]) for side in ("chosen_ids", "rejected_ids") for x in rows]
        scores, resp = response_scores(model, examples, log_probs=kind == "logp")
        if kind == "logp":
            values = (scores * resp).sum(-1)
        else:
            last = resp.long().cumsum(-1).argmax(-1)  # the last response position
            values = scores[torch.arange(len(examples)), last]
        values = values.tolist()
        out += list(zip(values[:len(rows)], values[len(rows):]))
    return out


def accuracy(values: list[tuple[float, float]]) -> float | None:
    """How often the values order a pair as the gold does (a tie counts as wrong)."""
    return sum(c > r for c, r in values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------- DPO


def _lora(settings: TrainSettings):
    from peft import LoraConfig

    # all-linear: every Linear/Conv1D of the body (PEFT leaves the output layer out)
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def train_dpo(untuned: ModelSpec, encoded: list[dict], out_dir, settings: TrainSettings,
              log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """DPO from the untuned model on pre-tokenized pairs; saves a full HF folder (LoRA merged in)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        # Our rows already hold prompt_ids/chosen_ids/rejected_ids in the engine's tokenization; TRL's
        # own preparation would re-tokenize text and append EOS to every response.
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    class Progress(TrainerCallback):  # one short line per step instead of the Trainer's metric dicts
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log(f"  dpo step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"reward accuracy {logs.get('rewards/accuracies', float('nan')):.2f}")

    spec = dataclasses.replace(untuned, dtype="float32")  # train in float32 whatever it decodes in
    loaded = load(spec)
    # With LoRA the reference is the model with its adapter off; full fine-tuning needs a frozen copy.
    reference = None if settings.lora_r else load(spec).model
    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(
            output_dir=scratch, beta=settings.beta, learning_rate=settings.lr,
            num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
            seed=settings.seed, data_seed=settings.seed, max_length=None,
            bf16=False, gradient_checkpointing=False,  # TRL's defaults are for big models on GPUs
            use_cpu=loaded.device.type == "cpu", save_strategy="no", report_to="none",
            logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant",
        )
        trainer = PreTokenized(loaded.model, ref_model=reference, args=args, train_dataset=Dataset.from_list(encoded),
                               processing_class=loaded.tokenizer,
                               peft_config=_lora(settings) if settings.lora_r else None,
                               callbacks=[Progress()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    model = trainer.model.merge_and_unload() if settings.lora_r else trainer.model
    logs = [r for r in trainer.state.log_history if "loss" in r]
    stats = {"steps": trainer.state.global_step, "loss_first": logs[0]["loss"] if logs else None,
             "loss_last": logs[-1]["loss"] if logs else None}
    return _save(model, loaded.tokenizer, out_dir), stats


# ---------------------------------------------------------------------------------------------- token RM


def attach_q_head(model) -> torch.nn.Linear:
    """Replace the LM head by a fresh, untied Linear(hidden, vocab) at zero: Q(s, .) = 0 everywhere until
    trained, so a token the data never showed stays neutral under token-wise guidance."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=False, device=old.weight.device)
    torch.nn.init.zeros_(head.weight)
    model.config.tie_word_embeddings = False  # the body's input embeddings stay as they are
    model.set_output_embeddings(head)
    return head


def train_token_rm(init: ModelSpec, encoded: list[dict], out_dir, settings: TrainSettings,
                   log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """FUDGE-style token RM: for every response prefix, Q(s_<t, a_t) is trained as the logit of "this
    response is the gold-chosen one of its pair" (BCE, chosen = 1, rejected = 0, each sequence weighted
    equally). Q of a whole response's last token then orders pairs like the gold."""
    loaded = load(dataclasses.replace(init, kind="causal_lm", dtype="float32"))
    model = loaded.model
    head = attach_q_head(model)
    if settings.lora_r:
        from peft import get_peft_model

        model = get_peft_model(model, _lora(settings))
        head.weight.requires_grad_(True)  # PEFT froze everything but the adapters; the head is new
    model.eval()  # no dropout, as TRL does for DPO; gradients flow all the same
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.rm_lr, weight_decay=0.0)
    examples = [((x["prompt_ids"], x[side]), float(side == "chosen_ids"))
                for x in encoded for side in ("chosen_ids", "rejected_ids")]
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    losses, steps = [], settings.epochs * math.ceil(len(examples) / settings.batch_size)
    for _ in range(settings.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), settings.batch_size):
            batch = [examples[i] for i in order[start:start + settings.batch_size]]
            q, resp = response_scores(model, [e for e, _ in batch], log_probs=False)  # (B, T-1)
            y = torch.tensor([label for _, label in batch], device=q.device)[:, None].expand_as(q)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(q, y, reduction="none")
            loss = ((bce * resp).sum(-1) / resp.sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            log(f"  token rm step {len(losses)}/{steps} loss {losses[-1]:.4f}")
    model = model.merge_and_unload() if settings.lora_r else model
    stats = {"steps": len(losses), "loss_first": losses[0] if losses else None,
             "loss_last": losses[-1] if losses else None}
    return _save(model, loaded.tokenizer, out_dir), stats


def _save(model, tokenizer, out_dir) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------- orchestration


def cache_key(config: GuideConfig, prompts: list[str]) -> str:
    """Everything that makes the guides: settings, models, gold, the prompts themselves (not `out`)."""
    facts = {"version": CACHE_VERSION, "untuned": dataclasses.asdict(config.untuned),
             "explicit_init": dataclasses.asdict(config.explicit_init or config.untuned),
             "gold": config.gold, "settings": dataclasses.asdict(config.settings),
             "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name or name).strip("-")[:48] or "model"


def _paths(config: GuideConfig, folder: Path) -> GuidePaths:
    folder_spec = dict(gguf_file=None, revision=None, trust_remote_code=False)
    return GuidePaths(
        tuned=dataclasses.replace(config.untuned, name=str(folder / "tuned"), **folder_spec),
        untuned=config.untuned,
        explicit=dataclasses.replace(config.explicit_init or config.untuned, name=str(folder / "explicit"),
                                     kind="token_reward", **folder_spec) if config.settings.token_rm else None,
        dir=folder)


def split_heldout(labelled: list[dict], heldout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts (a prompt's pairs share a context: splitting them would leak)."""
    prompts = sorted({x["prompt"] for x in labelled})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:round(heldout * len(prompts))])
    return [x for x in labelled if x["prompt"] not in held], [x for x in labelled if x["prompt"] in held]


def train_guides(config: GuideConfig, prompts: list[str], gold: Gold, force: bool = False,
                 log: Callable[[str], None] = print) -> GuidePaths:
    """Sample, label, train both guides, measure them, save: or reuse the cached folder for these settings."""
    s = config.settings
    check(len(prompts) >= s.n_prompts, "train.settings.n_prompts",
          f"asks for {s.n_prompts} prompts but only {len(prompts)} were given")
    prompts = list(prompts[:s.n_prompts])
    root = Path(config.out).expanduser() if config.out else cache_root() / "guides"
    folder = root / f"{_slug(config.untuned.name)}-{cache_key(config, prompts)}"
    if (folder / MARKER).is_file() and not force:
        log(f"guides: cached {folder}")
        return _paths(config, folder)

    start = time.perf_counter()
    timings = {}
    tmp = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    log(f"guides: sampling {s.pairs_per_prompt} pair(s) x {len(prompts)} prompts from {config.untuned.name}")
    pairs = sample_pairs(config.untuned, prompts, s.pairs_per_prompt, s.max_new_tokens, s.temperature, s.seed, s.stop)
    labelled = label_pairs(pairs, gold)
    train, held = split_heldout(labelled, s.heldout, s.seed)
    if not train:
        raise ValueError(f"no usable pairs: the gold ({config.gold}) tied or a response was empty in all {len(pairs)}")
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

    record = {"key": folder.name, "config": dataclasses.asdict(config), "n_prompts": len(prompts),
              "pairs_sampled": len(pairs), "pairs_labelled": len(labelled), "dpo": dpo_stats,
              "token_rm": rm_stats, "metrics": metrics, "timings": timings}
    write_cards(tmp, record)
    (tmp / MARKER).write_text(json.dumps(record, indent=1))
    if folder.exists():  # --force, or another process finished first: the newest wins
        shutil.rmtree(folder)
    tmp.rename(folder)
    log(f"guides: saved {folder} in {timings['total_s']:.0f}s")
    return _paths(config, folder)


# ---------------------------------------------------------------------------------------------- model cards


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_cards(folder: Path, record: dict) -> None:
    """A README.md per model: what it is, how to load it, the data, the training, its gold accuracy."""
    c, s, m = record["config"], record["config"]["settings"], record["metrics"]
    data = (f"- pairs: {record['pairs_sampled']} sampled from `{c['untuned']['name']}` ({s['pairs_per_prompt']} per "
            f"prompt, {record['n_prompts']} prompts, max_new_tokens={s['max_new_tokens']}, temperature={s['temperature']}, "
            f"stop={s['stop']}, seed={s['seed']}), labelled by the gold `{c['gold']}`; "
            f"{record['pairs_labelled']} kept (ties and empty responses dropped): "
            f"{m['train']['pairs']} train, {m['heldout']['pairs']} held out (by prompt, {s['heldout']:.0%}).\n"
            "- exact pairs: `../pairs.jsonl`; every setting: `../ivg-train.json`.\n")
    lora = f"LoRA r={s['lora_r']} alpha={s['lora_alpha']} on all linear layers, merged into the weights" \
        if s["lora_r"] else "full fine-tuning"
    accuracy_note = ("Gold accuracy: how often the value orders a pair (chosen, rejected) as the gold reward "
                     "does; a tie counts as wrong, chance is 50%.\n")
    cards = {
        "tuned": (
            "# DPO-tuned guide (implicit value)\n\n"
            f"`{c['untuned']['name']}` tuned with DPO (TRL) on gold-labelled pairs of its own samples. Used with "
            "its untuned start as the implicit value log pi_tuned - log pi_untuned.\n"
            f"Load: `ModelSpec(<this folder>, kind='causal_lm', template={c['untuned']['template']!r})`; "
            "a plain HF causal LM (safetensors).\n\n"
            f"## Data\n{data}\n"
            f"## Training\nDPO sigmoid loss, beta={s['beta']}, lr={s['lr']} (constant), epochs={s['epochs']}, "
            f"batch={s['batch_size']} pairs, {record['dpo']['steps']} steps, {lora}; loss "
            f"{record['dpo']['loss_first']} -> {record['dpo']['loss_last']}; {record['timings']['dpo_s']:.0f}s.\n\n"
            f"## Gold accuracy of the implicit reward sum_t (log pi_tuned - log pi_untuned)\n{accuracy_note}"
            f"- train: {_pct(m['train']['implicit_accuracy'])}\n"
            f"- held out: {_pct(m['heldout']['implicit_accuracy'])}\n"
            "- before training: 0% (tuned = untuned: every pair ties)\n"),
    }
    if record["token_rm"]:  # trained only with settings.token_rm
        cards["explicit"] = (
            "# Token reward model (explicit value)\n\n"
            f"Body of `{(c['explicit_init'] or c['untuned'])['name']}` with a fresh head Linear(hidden, vocab), "
            "stored as an ordinary causal LM whose logits are Q(s, .).\n"
            "Load: `ModelSpec(<this folder>, kind='token_reward')`.\n\n"
            f"## Data\n{data}\n"
            "## Training\nFUDGE-style: for each response prefix, Q(s_<t, a_t) is the logit that the response is "
            "the gold-chosen one of its pair (BCE, chosen = 1, rejected = 0, each sequence weighted equally). "
            f"Head initialized at zero (Q = 0 until trained); lr={s['rm_lr']} (AdamW, constant), "
            f"epochs={s['epochs']}, batch={s['batch_size']} sequences, {record['token_rm']['steps']} steps, "
            f"{lora.replace(', merged', ' + the head, merged')}; loss {record['token_rm']['loss_first']} -> "
            f"{record['token_rm']['loss_last']}; {record['timings']['token_rm_s']:.0f}s.\n\n"
            f"## Gold accuracy of Q at the last response token\n{accuracy_note}"
            f"- train: {_pct(m['train']['token_rm_accuracy'])}\n"
            f"- held out: {_pct(m['heldout']['token_rm_accuracy'])}\n")
    for name, text in cards.items():
        (folder / name / "README.md").write_text(text)
