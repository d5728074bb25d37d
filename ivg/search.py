"""Chunk-level beam search (CBS) over many prompts at once, with any token-wise guidance.

Per prompt: keep W beams; each step every unfinished beam grows K children by L sampled tokens
(the first step grows W*K children of the prompt); score every child; keep the top W of the
children and the finished beams (`method.finished`: each finished beam once, or K identical copies
as in the paper's code); stop when all kept beams are finished; return the best.
W=1, K=N, L=None is Best-of-N; W=K=1 is plain (or token-wise guided) sampling.

All rows of all prompts form one batch: one forward per model per token. The search only decides;
models live behind `roles.call({role: message})` (in-process, or Ray actors), with the messages of
ivg/protocol.py. Per token step the search sends each row's newest token and one uniform drawn from
its prompt's RNG stream; the base samples (with the token-wise value, which never reaches the
search) and returns the token and the value at it. Every model keeps its own KV cache per row; rows
are forked at chunk boundaries. Models are fed lazily: a row's newest token reaches the models with
the next step's forward, so a finished row never costs another forward.
Per-row state during a chunk is tensors over the rows: a step is a few tensor operations.
"""

import uuid
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ivg.config import DecodeConfig, MethodConfig
from ivg.protocol import Chunk, Close, Open, Sample, Sampling, Select, Step, StepAt
from ivg.sampling import Stopper, prompt_generator


@dataclass
class Beam:
    tokens: list[int]  # response tokens so far
    score: float = 0.0  # chunk-level value of this prefix
    scores: list[float] = field(default_factory=list)  # score after each chunk, along the lineage
    done: bool = False
    row: int = -1  # its row in the model sessions (unfinished beams only)
    log_ratio: float = 0.0  # running sum of log pi_t - log pi_u (token-wise implicit)
    last_q: float = 0.0  # Q(s, a) of the newest token (token-wise explicit)

    def child(self) -> "Beam":
        """A copy to grow; it starts on its parent's row, which `select` forks for it."""
        return replace(self, tokens=list(self.tokens), scores=list(self.scores))


@dataclass
class Child:
    prompt: int  # index of its prompt in the batch
    beam: Beam


@dataclass
class SearchOutput:
    tokens: list[int]
    response: str
    score: float
    chunk_scores: list[float]
    model_tokens: dict[str, int]  # tokens each role processed for this prompt (prefill included)


def search(prompt_ids: list[str], prompts: list[str], method: MethodConfig, decode: DecodeConfig,
           roles, stopper: Stopper, seed: int, max_new: list[int] | None = None) -> list[SearchOutput]:
    """Run one method over a batch of prompts; the output for a prompt depends only on it and seed.
    max_new: each prompt's own max_new_tokens (default: decode.max_new_tokens for all)."""
    return Search(prompt_ids, method, decode, roles, stopper, seed, max_new).run(prompts)


class Search:
    """The state one search's steps share: the method, the roles it uses, one session, the per-prompt RNGs."""

    def __init__(self, prompt_ids: list[str], method: MethodConfig, decode: DecodeConfig, roles,
                 stopper: Stopper, seed: int, max_new: list[int] | None = None):
        self.method, self.decode, self.roles, self.stopper = method, decode, roles, stopper
        self.max_new = list(max_new) if max_new is not None else [decode.max_new_tokens] * len(prompt_ids)
        self.W, self.K, self.L = method.W, method.K, method.L or max(self.max_new, default=1)
        self.token_role = None if method.token == "none" else method.token
        self.chunk_role = None if method.chunk == "none" else method.chunk
        self.used = ["base"] + sorted({r for r in (self.token_role, self.chunk_role) if r})
        self.gens = [prompt_generator(seed, pid) for pid in prompt_ids]
        self.sid = uuid.uuid4().hex

    def call(self, message) -> dict:
        """One message per role this method uses: message(role) -> a protocol message."""
        return self.roles.call({r: message(r) for r in self.used})

    def run(self, prompts: list[str]) -> list[SearchOutput]:
        sampling = Sampling(self.method.beta_token, self.decode)
        opened = self.call(lambda r: Open(self.sid, tuple(prompts), tuple(range(len(prompts))),
                                          sampling if r == "base" else None))
        self.needs_text = self.chunk_role is not None and opened[self.chunk_role].needs_text
        kept = [[Beam([], row=p)] for p in range(len(prompts))]
        first = True
        while any(not b.done for beams in kept for b in beams):
            # 1. expand: each unfinished beam gets K children (W*K for the prompt itself)
            children = [Child(p, b.child()) for p, beams in enumerate(kept) for b in beams if not b.done
                        for _ in range(self.W * self.K if first else self.K)]
            rows = np.array([c.beam.row for c in children], dtype=np.int64)
            self.call(lambda r: Select(self.sid, rows))
            # 2. sample L tokens for every child
            new = self.sample_chunk([c.beam for c in children], [c.prompt for c in children])
            # 3. score every child's prefix
            scores = self.score([c.beam for c in children], new)
            # 4. keep the top W per prompt, finished beams (once, or K copies) competing with the children
            kept = keep_top(kept, children, scores, self.W, self.method.finished, self.K)
            first = False
        counts = self.call(lambda r: Close(self.sid))
        return [SearchOutput(beams[0].tokens, self.stopper.text(beams[0].tokens), beams[0].score, beams[0].scores,
                             {r: int(counts[r].tokens.get(p, 0)) for r in self.used}) for p, beams in enumerate(kept)]

    def sample_chunk(self, beams: list[Beam], prompt_of: list[int]) -> list[list[int]]:
        """Grow each beam (row i of the sessions) by up to L tokens; returns the new tokens per row.
        A beam's newest token has not reached the models yet (lazy feeding). Rows of a prompt are
        consecutive (children are made prompt by prompt)."""
        R = len(beams)
        pending = torch.tensor([b.tokens[-1] if b.tokens else -1 for b in beams], dtype=torch.long)  # (R,) not yet fed
        length = torch.tensor([len(b.tokens) for b in beams], dtype=torch.long)  # (R,) response tokens
        done = torch.zeros(R, dtype=torch.bool)  # children of unfinished beams start live
        log_ratio = torch.tensor([b.log_ratio for b in beams], dtype=torch.float64)  # (R,)
        last_q = torch.tensor([b.last_q for b in beams], dtype=torch.float64)  # (R,)
        new = torch.full((R, self.L), -1, dtype=torch.long)  # (R, L) this chunk's tokens, -1 = none
        limits = torch.tensor([self.max_new[p] for p in prompt_of], dtype=torch.long)  # (R,) max_new_tokens
        spans = prompt_spans(prompt_of)  # [(prompt, first row, end row)]
        starts, ends = (torch.tensor(x, dtype=torch.long) for x in zip(*[(a, b) for _, a, b in spans]))

        def history(i: int) -> list[int]:
            return beams[i].tokens + [t for t in new[i].tolist() if t >= 0]

        for step in range(self.L):
            live = ~done
            if not bool(live.any()):
                break
            # a prompt draws one uniform per row while any of its rows is live (as ivg/reference.py)
            live_before = torch.cat([torch.zeros(1, dtype=torch.long), live.cumsum(0)])  # (R + 1,)
            drawing = (live_before[ends] > live_before[starts]).tolist()  # [prompts]
            uniforms = torch.cat([torch.rand(b - a, generator=self.gens[p], dtype=torch.float64) if d
                                  else torch.zeros(b - a, dtype=torch.float64)
                                  for (p, a, b), d in zip(spans, drawing)])
            messages = {"base": Sample(self.sid, pending.numpy(), uniforms.numpy(), value_from=self.token_role)}
            if self.token_role:
                messages[self.token_role] = Step(self.sid, pending.numpy())
            sampled = self.roles.call(messages)["base"]
            tokens = torch.tensor(sampled.tokens, dtype=torch.long)
            new[:, step] = torch.where(live, tokens, -1)
            length += live.to(torch.long)
            if self.token_role == "implicit":
                log_ratio[live] += torch.tensor(sampled.value, dtype=torch.float64)[live]
            elif self.token_role == "explicit":
                last_q[live] = torch.tensor(sampled.value, dtype=torch.float64)[live]
            done = done | (live & self.stopper.stops(tokens, length, history, limits))
            pending = torch.where(live & ~done, tokens, -1)
        chunk = [[t for t in row if t >= 0] for row in new.tolist()]
        for b, toks, d, lr, q in zip(beams, chunk, done.tolist(), log_ratio.tolist(), last_q.tolist()):
            b.tokens.extend(toks)
            b.done, b.log_ratio, b.last_q = d, lr, q
        return chunk

    def score(self, beams: list[Beam], new: list[list[int]]) -> list[float]:
        """The chunk-level value of each beam's whole prefix, times beta_chunk."""
        if self.chunk_role is None:
            return [0.0] * len(beams)
        eos = self.appends_eos(beams)
        if self.chunk_role == self.token_role:  # reuse the values computed while sampling
            if any(eos):
                self.value_at_eos(beams, eos)
            values = [b.log_ratio if self.chunk_role == "implicit" else b.last_q for b in beams]
        else:
            new = [n + [self.stopper.tokenizer.eos_token_id] if e else n for n, e in zip(new, eos)]
            texts = tuple(self.stopper.text(b.tokens) for b in beams) if self.needs_text else None
            chunk = Chunk(self.sid, tuple(map(tuple, new)), texts)
            values = self.roles.call({self.chunk_role: chunk})[self.chunk_role].values.tolist()
        return [self.method.beta_chunk * float(v) for v in values]

    def appends_eos(self, beams: list[Beam]) -> list[bool]:
        """Rows scored with the base's EOS appended (method.score_eos): those that ended on a stop
        string. A row that ended on EOS ends with one already; a row cut at max_new_tokens has not
        ended (the paper's code marks only EOS / stop-string rows finished) and gets none."""
        if not self.method.score_eos:
            return [False] * len(beams)
        return [b.done and self.stopper.ended(b.tokens) and b.tokens[-1] not in self.stopper.eos_ids for b in beams]

    def value_at_eos(self, beams: list[Beam], eos: list[bool]) -> None:
        """Token-wise and chunk-level share the role: its value at EOS after each `eos` row's response.
        Lazy feeding left each row's newest token out of the models; feed it (to this role only) and
        read the EOS entry: log-ratio(EOS) joins the implicit sum, Q(s, EOS) becomes the explicit value."""
        pending = np.array([b.tokens[-1] if e else -1 for b, e in zip(beams, eos)], dtype=np.int64)
        at = StepAt(self.sid, pending, self.stopper.tokenizer.eos_token_id)
        at_eos = self.roles.call({self.chunk_role: at})[self.chunk_role].values.tolist()  # (rows,)
        for b, e, v in zip(beams, eos, at_eos):
            if e and self.chunk_role == "implicit":
                b.log_ratio += v
            elif e:
                b.last_q = v


def prompt_spans(prompt_of: list[int]) -> list[tuple[int, int, int]]:
    """[(prompt, first row, end row)] of rows grouped by prompt, in row order."""
    spans = []
    for i, p in enumerate(prompt_of):
        if spans and spans[-1][0] == p:
            spans[-1] = (p, spans[-1][1], i + 1)
        else:
            spans.append((p, i, i + 1))
    assert len({p for p, _, _ in spans}) == len(spans), "a prompt's rows must be consecutive"
    return spans


def keep_top(kept, children, scores, W, finished: str = "keep_once", K: int = 1) -> list[list[Beam]]:
    """Per prompt, the W best of (finished kept beams + new children); ties keep the earlier one, and
    finished beams come first. finished="repeat" enters each finished kept beam K times, as the paper's
    code repeats every kept beam K times: identical copies (no forwards), each taking a slot it wins."""
    copies = K if finished == "repeat" else 1
    by_prompt = [[b.child() for b in beams if b.done for _ in range(copies)] for beams in kept]
    for row, (c, s) in enumerate(zip(children, scores)):
        c.beam.score, c.beam.scores, c.beam.row = s, c.beam.scores + [s], row
        by_prompt[c.prompt].append(c.beam)
    return [sorted(cands, key=lambda b: -b.score)[:W] for cands in by_prompt]
