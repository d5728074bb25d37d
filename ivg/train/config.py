"""The `train:` section: how the guides are made (ivg/train/guides.py), typed like every other section."""

import math
from dataclasses import dataclass, field

from ivg.config import ModelSpec, check
from ivg.eval.config import GoldSpec


@dataclass(frozen=True)
class TrainSettings:
    """What the guides learn from: responses sampled from the untuned model, scored by the gold.

    The prompts come in the held-out layout (ivg/train/layout.py): the first `heldout_prompts` guide
    prompts give one pair each to measure both values on and are never trained on; the next
    `n_prompts` (openings repeating an evaluated or held-out one dropped) are the training prompts,
    `responses` each, which both guides learn from: DPO ranks them, the token RM fits their win fractions."""

    n_prompts: int = 512  # training prompts
    responses: int = 4  # sampled per training prompt (even: sampled in pairs)
    heldout_prompts: int = 250  # one pair each, never trained on: the held-out accuracy of both values
    max_new_tokens: int = 24
    temperature: float = 1.0  # sampling: 1.0 = the untuned policy itself
    stop: tuple[str, ...] = ()  # stop strings for the sampled responses, e.g. ("\n",) as at decode time
    seed: int = 0
    batch: int = 128  # rows per sampling batch, and sequences per feature batch / 4

    def __post_init__(self):
        w = "train.settings"
        for name in ("n_prompts", "responses", "max_new_tokens", "batch"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{w}.{name}", "must be an integer >= 1")
        check(isinstance(self.heldout_prompts, int) and self.heldout_prompts >= 0, f"{w}.heldout_prompts",
              "must be an integer >= 0")
        check(self.responses % 2 == 0, f"{w}.responses", "must be even (responses are sampled in pairs)")
        check(self.temperature > 0, f"{w}.temperature", "must be > 0: a pair of greedy samples is one response twice")
        check(all(isinstance(s, str) and s for s in self.stop), f"{w}.stop", "must be a list of non-empty strings")


@dataclass(frozen=True)
class DPOSettings:
    """The implicit value: DPO on each training prompt's responses ranked by gold (ivg/train/dpo.py)."""

    layers: int | None = 8  # train the top k decoder layers, fed cached states (exact); null: every layer
    beta: float = 0.1
    lr: float = 1e-5  # AdamW, constant
    epochs: int = 2
    batch_size: int = 4  # prompts per step (each with all its responses)
    val_prompts: int = 0  # of the training prompts, the last val_prompts validate instead (early stopping)
    eval_every: int = 0  # steps between validations (0: once per epoch)
    patience: int = 0  # stop after this many validations without a better accuracy (0: never stop early)
    seed: int = 0

    def __post_init__(self):
        w = "train.dpo"
        check(self.layers is None or (isinstance(self.layers, int) and self.layers >= 1), f"{w}.layers",
              "must be >= 1, or null to train every layer")
        for name in ("epochs", "batch_size"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{w}.{name}", "must be an integer >= 1")
        for name in ("val_prompts", "eval_every", "patience"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, f"{w}.{name}", "must be an integer >= 0")
        for name in ("beta", "lr"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, f"{w}.{name}", "must be a positive number")


@dataclass(frozen=True)
class TokenRMSettings:
    """The explicit value: a token reward model, the frozen untuned body + a fitted head (ivg/train/token_rm.py)."""

    C: float = 0.01  # inverse L2 strength of the logistic regression (on standardised states)
    shrink: float = 20.0  # pseudo-counts pulling each token's bias b_a towards 0
    max_iter: int = 1000

    def __post_init__(self):
        check(math.isfinite(self.C) and self.C > 0, "train.token_rm.C", "must be > 0")
        check(math.isfinite(self.shrink) and self.shrink >= 0, "train.token_rm.shrink", "must be >= 0")
        check(self.max_iter >= 1, "train.token_rm.max_iter", "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    untuned: ModelSpec  # the policy the pairs are sampled from, DPO's start and reference, the token RM's body
    gold: GoldSpec | None = None  # labels the pairs; None: the run's eval.gold
    out: str | None = None  # None: <ivg cache>/guides ($IVG_CACHE, else ~/.cache/ivg)
    settings: TrainSettings = field(default_factory=TrainSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    token_rm: TokenRMSettings | None = field(default_factory=TokenRMSettings)  # null: no token RM

    def __post_init__(self):
        self.untuned.validate("train.untuned")
        check(self.untuned.kind == "causal_lm", "train.untuned.kind", "must be causal_lm")
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
