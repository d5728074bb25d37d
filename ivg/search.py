"""Chunk-level beam search (CBS) over many prompts at once, with any token-wise guidance.

Per prompt: keep W beams; each step every unfinished beam grows K children by L sampled tokens
(the first step grows W*K children of the prompt); score every child; keep the top W of the
children and the finished beams (`method.finished`: each finished beam once, or K identical copies
as in the paper's code); stop when all kept beams are finished; return the best.
W=1, K=N, L=None is Best-of-N; W=K=1 is plain (or token-wise guided) sampling.

All rows of all prompts form one batch: one forward per model per token. The search only decides;
models live behind `roles.call` (in-process, or Ray actors), which serves the protocol of
ivg/values.py. Every model keeps its own KV cache per row; rows are forked at chunk boundaries.
Models are fed lazily: a row's newest token reaches the base with the next step's forward, so a
finished row never costs another forward.
"""

import uuid
from dataclasses import dataclass, field, replace

import torch

from ivg.config import DecodeConfig, MethodConfig
from ivg.guidance import TokenGuidance, upcast
from ivg.sampling import Stopper, prompt_generator, sample


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
        self.guide = TokenGuidance(method.beta_token) if self.token_role else None
        self.gens = [prompt_generator(seed, pid) for pid in prompt_ids]
        self.sid = uuid.uuid4().hex

    def call(self, method: str, *args) -> dict:
        """The same call to every role this method uses."""
        return self.roles.call({r: (method, (self.sid, *args)) for r in self.used})

    def run(self, prompts: list[str]) -> list[SearchOutput]:
        self.call("open", prompts, list(range(len(prompts))))
        kept = [[Beam([], row=p)] for p in range(len(prompts))]
        first = True
        while any(not b.done for beams in kept for b in beams):
            # 1. expand: each unfinished beam gets K children (W*K for the prompt itself)
            children = [Child(p, b.child()) for p, beams in enumerate(kept) for b in beams if not b.done
                        for _ in range(self.W * self.K if first else self.K)]
            self.call("select", [c.beam.row for c in children])
            # 2. sample L tokens for every child
            new = self.sample_chunk([c.beam for c in children], [c.prompt for c in children])
            # 3. score every child's prefix
            scores = self.score([c.beam for c in children], new)
            # 4. keep the top W per prompt, finished beams (once, or K copies) competing with the children
            kept = keep_top(kept, children, scores, self.W, self.method.finished, self.K)
            first = False
        counts = self.call("close")
        return [SearchOutput(beams[0].tokens, self.stopper.text(beams[0].tokens), beams[0].score, beams[0].scores,
                             {r: int(counts[r].get(p, 0)) for r in self.used}) for p, beams in enumerate(kept)]

    def sample_chunk(self, beams: list[Beam], prompt_of: list[int]) -> list[list[int]]:
        """Grow each beam (row i of the sessions) by up to L tokens; returns the new tokens per row.
        A beam's newest token has not reached the models yet (lazy feeding)."""
        pending = [[b.tokens[-1]] if b.tokens else [] for b in beams]
        new = [[] for _ in beams]
        rows_of = {}
        for i, p in enumerate(prompt_of):
            rows_of.setdefault(p, []).append(i)
        for _ in range(self.L):
            live = [i for i, b in enumerate(beams) if not b.done]
            if not live:
                break
            out = self.roles.call({r: ("next", (self.sid, pending)) for r in ["base", self.token_role] if r})
            logits = torch.as_tensor(out["base"])
            value = torch.as_tensor(out[self.token_role]) if self.token_role else None
            z = upcast(logits) if value is None else self.guide(logits, value)
            uniforms = torch.zeros(len(beams), dtype=torch.float64)
            for p, rows in rows_of.items():  # a prompt draws while any of its rows is live
                if any(not beams[i].done for i in rows):
                    uniforms[rows] = torch.rand(len(rows), generator=self.gens[p], dtype=torch.float64)
            tokens = sample(z, uniforms, self.decode).tolist()
            picked = value.gather(-1, torch.tensor(tokens, device=value.device)[:, None]).squeeze(-1).tolist() \
                if value is not None else None
            pending = [[] for _ in beams]
            for i in live:
                b = beams[i]
                b.tokens.append(tokens[i])
                new[i].append(tokens[i])
                if self.token_role == "implicit":
                    b.log_ratio += picked[i]
                elif self.token_role == "explicit":
                    b.last_q = picked[i]
                b.done = self.stopper.done(b.tokens, self.max_new[prompt_of[i]])
                if not b.done:
                    pending[i] = [tokens[i]]
        return new

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
            texts = [self.stopper.text(b.tokens) for b in beams]
            values = self.roles.call({self.chunk_role: ("chunk", (self.sid, new, texts))})[self.chunk_role]
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
        pending = [[b.tokens[-1]] if e else [] for b, e in zip(beams, eos)]
        out = self.roles.call({self.chunk_role: ("next", (self.sid, pending))})[self.chunk_role]
        at_eos = torch.as_tensor(out)[:, self.stopper.tokenizer.eos_token_id].tolist()  # (rows,)
        for b, e, v in zip(beams, eos, at_eos):
            if e and self.chunk_role == "implicit":
                b.log_ratio += v
            elif e:
                b.last_q = v


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
