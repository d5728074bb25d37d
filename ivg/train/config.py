"""The `train:` section: how the guides are made (ivg/train/guides.py), typed like every other section."""

import math
from dataclasses import dataclass, field

from ivg.config import ModelSpec, check
from ivg.eval.config import GoldSpec


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
class TrainConfig:
    untuned: ModelSpec  # the policy the pairs are sampled from, DPO's start and reference
    gold: GoldSpec | None = None  # labels the pairs; None: the run's eval.gold
    out: str | None = None  # None: <ivg cache>/guides ($IVG_CACHE, else ~/.cache/ivg)
    explicit_init: ModelSpec | None = None  # the token RM's body; None = the untuned model
    settings: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self):
        self.untuned.validate("train.untuned")
        check(self.untuned.kind == "causal_lm", "train.untuned.kind", "must be causal_lm")
        if self.explicit_init is not None:
            self.explicit_init.validate("train.explicit_init")
        if self.gold is not None:
            self.gold.validate("train.gold")


@dataclass(frozen=True)
class ProbeSettings:
    n: int = 2000  # labelled texts used (train + held out)
    heldout: float = 0.2
    C: float = 1.0  # inverse L2 strength of the logistic regression
    batch_size: int = 32
    max_tokens: int = 64  # texts are cut to their first tokens, like the short prefixes scored at decode time
    seed: int = 0

    def __post_init__(self):
        check(self.n >= 10, "experiment.explicit_probe.settings.n", "must be >= 10")
        check(0 < self.heldout < 1, "experiment.explicit_probe.settings.heldout", "must be in (0, 1)")
        check(self.C > 0, "experiment.explicit_probe.settings.C", "must be > 0")
        check(self.batch_size >= 1 and self.max_tokens >= 2, "experiment.explicit_probe.settings.batch_size", "batch_size >= 1, max_tokens >= 2")




@dataclass(frozen=True)
class ProbeConfig:
    """`experiment.explicit_probe`: the explicit value as a reward probe on labelled texts (ivg/train/probe.py)."""

    body: ModelSpec  # the frozen LM whose last-token hidden state the head reads
    path: str  # Parquet/JSONL of labelled texts, or asset:<name>
    text_column: str = "text"
    label_column: str = "label"  # 0/1
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    out: str | None = None  # None: <ivg cache>/probes/<key>

    def __post_init__(self):
        self.body.validate("experiment.explicit_probe.body")
