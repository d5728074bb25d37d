"""The engine: roles loaded once, methods run over batches of prompts, output rows out.

`Engine.local(config)` loads every model in this process; pipeline/ builds the same Engine over
Ray actors by passing its own `roles` client. Either way the search code is ivg/search.py.
"""

import time

from ivg.config import AUTO, TRUNCATE, ConfigError, GenerationConfig, MethodConfig, check
from ivg.models import load, load_tokenizer, same_vocab
from ivg.protocol import Check, Close, Cut, Open, Room, Sample
from ivg.sampling import Stopper
from ivg.search import search
from ivg.values import BaseRole, ImplicitRole, explicit_role


class LocalRoles:
    """Roles in this process; `call` answers one message per role (ivg/protocol.py), one after another:
    a Sample last, handed the v(s, .) tensor of the Step it names (which the caller does not get)."""

    def __init__(self, roles: dict):
        self.roles = roles
        self.open_sessions: set[str] = set()  # to drop if a search fails midway

    def call(self, messages: dict) -> dict:
        for m in messages.values():
            if isinstance(m, Open):
                self.open_sessions.add(m.sid)
        out = answer(self.roles, messages)
        for m in messages.values():
            if isinstance(m, Close):
                self.open_sessions.discard(m.sid)
        return out

    def drop_open_sessions(self) -> None:
        """After a failed search: forget its sessions (their caches would otherwise stay)."""
        for role in self.roles.values():
            for sid in self.open_sessions:
                role.sessions.pop(sid, None)
        self.open_sessions = set()


def answer(roles: dict, messages: dict, value_of=None) -> dict:
    """{role: message} -> {role: result} by roles in this process. A Sample takes its value from the Step
    of the role it names in the same call, or, if that role is not in the call, `value_of(sample)`."""
    out = {name: roles[name].handle(m) for name, m in messages.items() if not isinstance(m, Sample)}
    for name, m in messages.items():
        if isinstance(m, Sample):
            if m.value_from in messages:
                value, out[m.value_from] = out[m.value_from], None
            else:
                value = value_of(m) if m.value_from else None
            out[name] = roles[name].handle(m, value)
    return out


def check_vocabularies(config: GenerationConfig, tokenizers: dict) -> None:
    """Token-wise guidance adds value vectors to the base logits: refuse mismatched vocabularies."""
    for i, m in enumerate(config.methods):
        check_score_eos(config, tokenizers, i, m)
        if m.token == "none":
            continue
        guides = ("tuned", "untuned") if m.token == "implicit" else ("explicit",)
        for role in guides:
            if not same_vocab(tokenizers["base"], tokenizers[role]):
                raise ConfigError(
                    f"methods[{i}].token: token-wise {m.token} guidance needs models.{role} to share the "
                    f"base's vocabulary ({config.models.base.name} vs {getattr(config.models, role).name}); "
                    "use chunk-level guidance for models with different tokenizers")


def check_score_eos(config: GenerationConfig, tokenizers: dict, i: int, m: MethodConfig) -> None:
    """score_eos appends the base's EOS id to what the chunk scorer reads: it must share the vocabulary."""
    if not m.score_eos:
        return
    for role in ("tuned", "untuned") if m.chunk == "implicit" else ("explicit",):
        if not same_vocab(tokenizers["base"], tokenizers[role]):
            raise ConfigError(
                f"methods[{i}].score_eos: appending the base's EOS before scoring needs models.{role} to "
                f"share the base's vocabulary ({config.models.base.name} vs {getattr(config.models, role).name}); "
                "set score_eos: false for this scorer")


def needed_roles(config: GenerationConfig) -> list[str]:
    """base, plus every value function some method uses, token-wise or chunk-level."""
    used = {g for m in config.methods for g in (m.token, m.chunk)} - {"none"}
    return ["base"] + sorted(used)


def load_role(name: str, config: GenerationConfig, base_tokenizer):
    models = config.models
    if name == "base":
        return BaseRole([load(models.base, decoding=True)], base_tokenizer)
    if name == "implicit":
        return ImplicitRole(load(models.tuned, decoding=True), load(models.untuned, decoding=True), base_tokenizer)
    return explicit_role(load(models.explicit, decoding=True), base_tokenizer)


def eos_ids(base_tokenizer, base_generation_config=None) -> set[int]:
    ids = {base_tokenizer.eos_token_id} - {None}
    extra = getattr(base_generation_config, "eos_token_id", None)
    ids |= set(extra if isinstance(extra, list) else [extra]) - {None}
    return ids


class Engine:
    """`truncate` says what happens to a prompt longer than a model's context (less max_new_tokens):
    "fail" makes its row failed; "left" cuts characters from its start until every model's view fits,
    and the row records how many (`truncated`; the row's `prompt` stays the input's)."""

    def __init__(self, config: GenerationConfig, roles, tokenizer, eos: set[int], truncate: str = "fail"):
        check(truncate in TRUNCATE, "truncate", f"{truncate!r} is not one of {TRUNCATE}")
        check(not (truncate == "left" and config.decode.max_new_tokens == AUTO), "truncate",
              "left truncation makes room for max_new_tokens, and max_new_tokens: auto is whatever room "
              "the prompt leaves; set a number of new tokens, or truncate: fail")
        for i, m in enumerate(config.methods):
            check(not m.score_eos or tokenizer.eos_token_id is not None, f"methods[{i}].score_eos",
                  "the base's tokenizer has no EOS token to append; set score_eos: false")
        self.config, self.roles, self.tokenizer, self.truncate = config, roles, tokenizer, truncate
        self.stopper = Stopper(tokenizer, config.decode, eos)

    @classmethod
    def local(cls, config: GenerationConfig, truncate: str = "fail") -> "Engine":
        """Every model this config needs, loaded in this process (vocabularies checked first)."""
        tokenizers = {r: load_tokenizer(getattr(config.models, r))
                      for r in ("base", "tuned", "untuned", "explicit") if getattr(config.models, r)}
        check_vocabularies(config, tokenizers)
        return cls.from_roles(config, {name: load_role(name, config, tokenizers["base"])
                                       for name in needed_roles(config)}, truncate)

    @classmethod
    def from_roles(cls, config: GenerationConfig, roles: dict, truncate: str = "fail") -> "Engine":
        """An engine over roles already loaded in this process (e.g. by a benchmark that measures them)."""
        base = roles["base"].models[0]
        return cls(config, LocalRoles(roles), base.tokenizer,
                   eos_ids(base.tokenizer, getattr(base.model, "generation_config", None)), truncate)

    def run(self, rows: list[dict], method: MethodConfig) -> list[dict]:
        """Rows with `id` and `prompt` in, one output row per prompt out, in the same order.

        A prompt that a model cannot take becomes a `failed` row with its reason; the others run."""
        prompts = [r["prompt"] for r in rows]
        used = {"base"} | {g for g in (method.token, method.chunk) if g != "none"}
        max_new = self.config.decode.max_new_tokens
        auto = max_new == AUTO
        limits, room_errors = self.room(prompts, used) if auto else ([max_new] * len(rows), [None] * len(rows))
        cuts = [0] * len(rows)
        if self.truncate == "left":  # the longest cut any role needs fits them all
            needed = self.roles.call({r: Cut(tuple(prompts), max_new) for r in used})
            cuts = [max(c.chars[i] for c in needed.values()) for i in range(len(rows))]
            prompts = [p[k:] for p, k in zip(prompts, cuts)]
        checks = self.roles.call({r: Check(tuple(prompts), 1 if auto else max_new) for r in used})
        errors = [room_errors[i] or next((f"{r}: {c.errors[i]}" for r, c in sorted(checks.items()) if c.errors[i]),
                                         None) for i in range(len(rows))]
        ok = [i for i, e in enumerate(errors) if e is None]
        start = time.perf_counter()
        outputs = search([str(rows[i]["id"]) for i in ok], [prompts[i] for i in ok], method,
                         self.config.decode, self.roles, self.stopper, self.config.seed,
                         [limits[i] for i in ok]) if ok else []
        wall = (time.perf_counter() - start) / max(len(ok), 1)  # the batch's time, shared equally
        by_row = dict(zip(ok, outputs))
        return [self.row(rows[i], method, by_row.get(i), errors[i], wall, cuts[i]) for i in range(len(rows))]

    def room(self, prompts: list[str], used: set[str]) -> tuple[list, list]:
        """max_new_tokens: auto. Per prompt, the fewest tokens any model of the used roles has left in
        its context after its own view of the prompt, and why there is none (None: there is room)."""
        rooms = self.roles.call({r: Room(tuple(prompts)) for r in used})
        limits, errors = [], []
        for i in range(len(prompts)):
            known = {r: c.tokens[i] for r, c in sorted(rooms.items()) if c.tokens[i] is not None}
            limit = min(known.values(), default=None)
            limits.append(limit)
            if limit is None:
                errors.append(f"max_new_tokens: auto needs a context length, and no model of {sorted(used)} "
                              "names one in its config; set max_new_tokens to a number")
            elif limit < 1:
                r = min(known, key=known.get)
                errors.append(f"{r}: the prompt fills the model's context ({limit} tokens of room left): "
                              "max_new_tokens: auto leaves no room for a response; shorten the prompt")
            else:
                errors.append(None)
        return limits, errors

    def row(self, row: dict, method: MethodConfig, out, error: str | None, wall: float, truncated: int = 0) -> dict:
        """The output row of one prompt: a result, or (out=None) a failed row with its reason."""
        return {
            "id": str(row["id"]), "prompt": row["prompt"],
            "response": out.response if out else None,
            "method": method.label, "token": method.token, "chunk": method.chunk,
            "W": method.W, "K": method.K, "L": method.L,
            "beta_token": method.beta_token, "beta_chunk": method.beta_chunk,
            "seed": self.config.seed,
            "n_new_tokens": len(out.tokens) if out else 0,
            "model_tokens": out.model_tokens if out else {},
            "wall_s": wall if out else 0.0,
            # a method without a chunk-level scorer has no scores: null, not an invented 0
            "score": out.score if out and method.chunk != "none" else None,
            "chunk_scores": out.chunk_scores if out and method.chunk != "none" else None,
            "status": "ok" if out else "failed",
            "error": error,
            "truncated": truncated,  # characters cut from the prompt's start
        }
