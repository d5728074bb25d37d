"""Typed configuration of the method: models, decoding, and the grid cells (methods) to run.

Every dataclass validates itself in __post_init__ with a message naming the field, so a bad config
fails at load time, not an hour into a cluster job. `from_dict` builds any of these dataclasses from
plain YAML data and rejects unknown keys (a typo is an error, not a silently ignored setting).
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field

GUIDANCE = ("none", "implicit", "explicit")
MODEL_KINDS = ("causal_lm", "token_reward", "classifier")
DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")
TRUNCATE = ("fail", "left")  # a prompt longer than the context: fail its row, or cut its start
FINISHED = ("keep_once", "repeat")  # what a finished beam becomes in the next round of a search
AUTO = "auto"  # max_new_tokens: each prompt's room in the context


class ConfigError(ValueError):
    """A config value is wrong; the message names the field (e.g. `methods[2].W`)."""


def check(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg}")


def plain_name(name: str) -> bool:
    """A name that is safe as a file name: no separators, no `..`, not hidden (it may name output files)."""
    return re.fullmatch(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*", name) is not None and ".." not in name


@dataclass(frozen=True)
class ModelSpec:
    name: str  # hub id, local folder, GGUF file/folder, `tiny:<x>` / `tiny-b:<x>`, or `asset:<name>`
    kind: str = "causal_lm"  # causal_lm | token_reward (LM body + vocab head = Q(s,.)) | classifier
    gguf_file: str | None = None  # file name inside `name` (a folder or hub repo) to load GGUF weights
    dtype: str = "auto"  # auto = bfloat16 on GPU and, decoding, on CPUs with native bf16; else float32
    device: str = "auto"  # auto = cuda if available, else cpu
    # How this model sees the prompt: a format string with {prompt}, "chat" for the tokenizer's chat
    # template, or None for the bare prompt. The paper's IMDB base sees a template, the guides do not.
    template: str | None = None
    positive_label: str | None = None  # classifier: score = logit[positive] - logit[other]; None: logit 0
    trust_remote_code: bool = False  # runs the repository's own Python: only for sources you trust
    allow_pickle: bool = False  # load a pickle checkpoint (*.bin, *.pt), which can run code on load
    revision: str | None = None

    def validate(self, where: str) -> None:
        check(bool(self.name), f"{where}.name", "must name a model")
        check(self.kind in MODEL_KINDS, f"{where}.kind", f"{self.kind!r} is not one of {MODEL_KINDS}")
        check(self.dtype in DTYPES, f"{where}.dtype", f"{self.dtype!r} is not one of {DTYPES}")
        check(self.template in (None, "chat") or "{prompt}" in self.template, f"{where}.template",
              "must be null, 'chat', or a format string containing {prompt}")


@dataclass(frozen=True)
class Models:
    base: ModelSpec
    tuned: ModelSpec | None = None  # implicit value = log pi_tuned - log pi_untuned
    untuned: ModelSpec | None = None
    explicit: ModelSpec | None = None  # token reward model or sequence classifier

    def validate(self, where: str = "models") -> None:
        for role in ("base", "tuned", "untuned", "explicit"):
            spec = getattr(self, role)
            if spec is not None:
                spec.validate(f"{where}.{role}")
        check(self.base.kind == "causal_lm", f"{where}.base.kind", "the base must be a causal_lm")
        check((self.tuned is None) == (self.untuned is None), f"{where}.tuned",
              "the implicit value needs both tuned and untuned (or neither)")
        for role in ("tuned", "untuned"):
            spec = getattr(self, role)
            check(spec is None or spec.kind == "causal_lm", f"{where}.{role}.kind", "must be causal_lm")


@dataclass(frozen=True)
class DecodeConfig:
    # an integer, or "auto": per prompt, the room its views leave in the contexts of the models the
    # method uses (min over models of context - prompt tokens), as the paper's AlpacaEval runs do
    max_new_tokens: int | str = 50
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings, e.g. ("\n",); the stop string is cut from the response
    stop_at_eos: bool = True

    def validate(self, where: str = "decode") -> None:
        check(self.max_new_tokens == AUTO or (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1),
              f"{where}.max_new_tokens", f"must be an integer >= 1, or {AUTO!r} (each prompt's room in the context)")
        check(self.temperature >= 0, f"{where}.temperature", "must be >= 0 (0 means greedy)")
        check(self.top_k >= 0, f"{where}.top_k", "must be >= 0 (0 turns it off)")
        check(0 < self.top_p <= 1, f"{where}.top_p", "must be in (0, 1]")
        check(all(isinstance(s, str) and s for s in self.stop), f"{where}.stop",
              "must be a list of non-empty strings")


@dataclass(frozen=True)
class MethodConfig:
    """One cell of the grid token-wise x chunk-level, with its search shape."""

    token: str = "none"  # token-wise guidance: none | implicit | explicit
    chunk: str = "none"  # chunk-level guidance (beam scoring): none | implicit | explicit
    W: int = 1  # beams kept per step
    K: int = 1  # children sampled per beam
    L: int | None = None  # tokens per chunk; None = until the end (Best-of-N)
    beta_token: float = 1.0
    beta_chunk: float = 1.0
    name: str | None = None  # defaults to the cell's name, e.g. "tok-implicit+cbs-explicit"
    # A finished beam in the next round: keep_once = it competes once with the children of the others;
    # repeat = it is repeated K times like every kept beam (the paper's code), so identical copies can
    # fill up to K of the W slots. Copies cost no forwards. Both end when all kept beams are finished.
    finished: str = "keep_once"
    # Score a response that ended on a stop string as ending with the base's EOS (the implicit sum
    # includes log-ratio(EOS), the explicit value is read at EOS), as the paper's scorers do. A response
    # that ended on EOS already ends with one; one cut at max_new_tokens has not ended and gets none.
    score_eos: bool = False

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = ([f"tok-{self.token}"] if self.token != "none" else []) + (
            [f"cbs-{self.chunk}"] if self.chunk != "none" else [])
        return "+".join(parts) or "base"

    def validate(self, where: str, models: Models) -> None:
        check(self.token in GUIDANCE, f"{where}.token", f"unknown method {self.token!r}; use one of {GUIDANCE}")
        check(self.chunk in GUIDANCE, f"{where}.chunk", f"unknown method {self.chunk!r}; use one of {GUIDANCE}")
        check(self.W >= 1, f"{where}.W", "must be >= 1")
        check(self.K >= 1, f"{where}.K", "must be >= 1")
        check(self.L is None or self.L >= 1, f"{where}.L", "must be >= 1 (or null for whole responses)")
        check(self.finished in FINISHED, f"{where}.finished", f"{self.finished!r} is not one of {FINISHED}")
        check(not self.score_eos or self.chunk != "none", f"{where}.score_eos",
              "changes chunk-level scores, and this method has none (set chunk: implicit|explicit)")
        check(self.chunk != "none" or self.W * self.K == 1, f"{where}.chunk",
              "W*K > 1 needs a chunk-level scorer to choose between beams (set chunk: implicit|explicit)")
        for g in (self.token, self.chunk):
            if g == "implicit":
                check(models.tuned is not None, f"{where}", "implicit guidance needs models.tuned and models.untuned")
            if g == "explicit":
                check(models.explicit is not None, f"{where}", "explicit guidance needs models.explicit")
        if self.token == "explicit":
            check(models.explicit.kind == "token_reward", f"{where}.token",
                  "token-wise explicit guidance needs models.explicit.kind = token_reward (Q(s,.) over the vocab)")
        check(math.isfinite(self.beta_token) and math.isfinite(self.beta_chunk), f"{where}.beta",
              "must be finite")
        check(self.name is None or plain_name(self.name), f"{where}.name",
              f"{self.name!r} must be a plain name (letters, digits, _ . + -): it names output files")


@dataclass(frozen=True)
class GenerationConfig:
    """Everything the engine needs: the models, how to decode, and which cells to run."""

    models: Models
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    methods: tuple[MethodConfig, ...] = (MethodConfig(),)
    seed: int = 0

    def __post_init__(self):
        self.models.validate()
        self.decode.validate()
        check(len(self.methods) >= 1, "methods", "needs at least one method")
        for i, m in enumerate(self.methods):
            m.validate(f"methods[{i}]", self.models)
        labels = [m.label for m in self.methods]
        check(len(set(labels)) == len(labels), "methods", f"method names must be unique, got {labels}")


def from_dict(cls, data, where: str = ""):
    """Build dataclass `cls` from YAML data, checking keys and types; errors name the field."""
    if dataclasses.is_dataclass(data):
        return data
    check(isinstance(data, dict), where or "config", f"expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    check(not unknown, where or "config", f"unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    check(not missing, where or "config", f"missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _convert(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            check(type(None) in args, where, "must not be null")
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for tp_ in inner:  # the first type the value converts to (e.g. int | str: 8 or "auto")
            try:
                return _convert(tp_, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {' or '.join(t.__name__ for t in inner)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        check(isinstance(value, (list, tuple)), where, f"expected a list, got {type(value).__name__}")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        check(isinstance(value, dict), where, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), where,
              f"expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        check(isinstance(value, tp) and not (tp is int and isinstance(value, bool)), where,
              f"expected {tp.__name__}, got {value!r}")
        return value
    return value
