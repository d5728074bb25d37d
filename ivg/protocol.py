"""The messages between a search and its roles: one frozen dataclass per verb and per result.

A search (ivg/search.py) sends `{role: message}` through a roles client (`ivg.engine.LocalRoles` in
process, `pipeline.remote.RemoteRoles` to Ray actors) and gets `{role: result}` back. Every message
and result that is ever sent is here; per-row fields are numpy arrays (or tuples), never tensors
over the vocabulary: per token step a search sends and receives O(rows) numbers.

  message                 to            result        when
  Open(sid, prompts, ..)  every role    Opened        once per search: prefill each model's prompt view
  Select(sid, rows)       every role    None          per chunk: fork / reorder / drop rows
  Step(sid, tokens)       value role    None*         per token: feed the newest token; keep v(s, .)
  Sample(sid, tokens, ..) base          Sampled       per token: feed, z = logits + beta * v, warp, sample
  StepAt(sid, tokens, at) value role    Scores        per chunk (score_eos): feed the newest token, v(s, at)
  Chunk(sid, new, texts)  chunk scorer  Scores        per chunk: each row's value of its whole response
  Check(prompts, n)       every role    Problems      before a search: why a prompt cannot run
  Cut(prompts, n)         every role    Cuts          before a search (truncate: left): characters to cut
  Room(prompts)           every role    Rooms         before a search (max_new_tokens: auto): tokens left
  Close(sid)              every role    Closed        once per search: tokens each owner cost

* A Step's result, the value vector v(s, .) (rows, V), goes to the `Sample` of the same call that
  names its role in `value_from`, never back to the search: in process it is handed over as a
  tensor, between actors as a reference the base server resolves (the vector travels server to
  server). The base returns per row only the sampled token and v at that token.
"""

from dataclasses import dataclass

import numpy as np

from ivg.config import DecodeConfig


@dataclass(frozen=True)
class Sampling:
    """How the base turns its logits (plus a token-wise value) into tokens; sent once, with Open."""

    beta: float  # z = logits_base + beta * value (ignored without a value)
    decode: DecodeConfig  # temperature, top_k, top_p (processing order: ivg/sampling.py)


@dataclass(frozen=True)
class Open:
    sid: str  # the search session
    prompts: tuple[str, ...]  # [prompts] one row each until the first Select
    owners: tuple[int, ...]  # [prompts] who pays for each row's tokens (a prompt's index)
    sampling: Sampling | None = None  # base only


@dataclass(frozen=True)
class Opened:
    needs_text: bool  # the role re-tokenizes the response text (another vocabulary, or no cache)


@dataclass(frozen=True)
class Select:
    sid: str
    rows: np.ndarray  # [new rows] int64: the old row each new row continues


@dataclass(frozen=True)
class Step:
    sid: str
    tokens: np.ndarray  # [rows] int64: each row's newest token, not yet fed; -1 = nothing new


@dataclass(frozen=True)
class Sample:
    sid: str
    tokens: np.ndarray  # [rows] int64: as Step.tokens
    uniforms: np.ndarray  # [rows] float64 in [0, 1): each row's draw from its prompt's RNG stream
    value_from: str | None = None  # the role whose Step in the same call gives v(s, .); None: no guidance
    value: object = None  # filled by the client: (rows, V) tensor, or a reference the server resolves


@dataclass(frozen=True)
class Sampled:
    tokens: np.ndarray  # [rows] int64: the sampled token (rows nobody draws for: any token, ignored)
    value: np.ndarray | None  # [rows] float64: v(s, token), for the chunk-level sum; None without guidance


@dataclass(frozen=True)
class StepAt:
    sid: str
    tokens: np.ndarray  # [rows] int64: as Step.tokens
    at: int  # a token id: each row's value v(s, at) comes back (the base's EOS, for score_eos)


@dataclass(frozen=True)
class Chunk:
    sid: str
    new: tuple[tuple[int, ...], ...]  # [rows][tokens]: each row's tokens since the last Chunk / Select
    texts: tuple[str, ...] | None  # [rows] the whole response text, for roles that need it (Opened.needs_text)


@dataclass(frozen=True)
class Scores:
    values: np.ndarray  # [rows] float64: the chunk-level value of each row's response so far


@dataclass(frozen=True)
class Check:
    prompts: tuple[str, ...]  # [prompts]
    max_new_tokens: int


@dataclass(frozen=True)
class Problems:
    errors: tuple[str | None, ...]  # [prompts] why the role cannot take the prompt; None: it can


@dataclass(frozen=True)
class Cut:
    prompts: tuple[str, ...]  # [prompts]
    max_new_tokens: int


@dataclass(frozen=True)
class Cuts:
    chars: tuple[int, ...]  # [prompts] characters to cut from the start so that every model's view fits


@dataclass(frozen=True)
class Room:
    prompts: tuple[str, ...]  # [prompts]


@dataclass(frozen=True)
class Rooms:
    tokens: tuple[int | None, ...]  # [prompts] tokens left in the tightest context; None: no context known


@dataclass(frozen=True)
class Close:
    sid: str


@dataclass(frozen=True)
class Closed:
    tokens: dict  # {owner: tokens the role's models processed for it, prefill included}


SESSION_MESSAGES = (Select, Step, Sample, StepAt, Chunk, Close)  # need an open session
PER_TOKEN = (Step, Sample)  # batched across searches by the model servers
