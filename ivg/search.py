"""Chunk-level beam search (CBS) over many prompts at once, with any token-wise guidance.

Per prompt: keep W beams; each step every unfinished beam grows K children by L sampled tokens
(the first step grows W*K children of the prompt); score every child; keep the top W of the
children and the finished beams; stop when all kept beams are finished; return the best.
W=1, K=N, L=None is Best-of-N; W=K=1 is plain (or token-wise guided) sampling.

All rows of all prompts form one batch: one forward per model per token. The search only decides;
models live behind `roles.call` (in-process, or Ray actors), which serves the protocol of
ivg/values.py. Every model keeps its own KV cache per row; rows are forked at chunk boundaries.
Models are fed lazily: a row's newest token reaches the base with the next step's forward, so a
finished row never costs another forward.
"""

import uuid
from dataclasses import dataclass, field

import torch

from ivg.config import DecodeConfig, MethodConfig
from ivg.guidance import token_guidance
from ivg.sampling import Stopper, prompt_generator, sample, upcast


@dataclass
class Beam:
    tokens: list[int]  # response tokens so far
    score: float = 0.0  # chunk-level value of this prefix
    scores: list[float] = field(default_factory=list)  # score after each chunk, along the lineage
    done: bool = False
    row: int = -1  # its row in the model sessions (unfinished beams only)
    log_ratio: float = 0.0  # running sum of log pi_t - log pi_u (token-wise implicit)
    last_q: float = 0.0  # Q(s, a) of the newest token (token-wise explicit)


@dataclass
class Child:
    prompt: int
    beam: Beam


@dataclass
class SearchOutput:
    tokens: list[int]
    response: str
    score: float
    chunk_scores: list[float]
    model_tokens: dict[str, int]  # tokens each role processed for this prompt (prefill included)


def search(prompt_ids: list[str], prompts: list[str], method: MethodConfig, decode: DecodeConfig,
           roles, stopper: Stopper, seed: int) -> list[SearchOutput]:
    """Run one method over a batch of prompts; the output for a prompt depends only on it and seed."""
    W, K, L = method.W, method.K, method.L or decode.max_new_tokens
    token_role = None if method.token == "none" else method.token
    chunk_role = None if method.chunk == "none" else method.chunk
    used = ["base"] + sorted({r for r in (token_role, chunk_role) if r})
    guide = token_guidance(method.token, method.beta_token)
    gens = [prompt_generator(seed, pid) for pid in prompt_ids]
    sid = uuid.uuid4().hex
    owners = list(range(len(prompts)))
    roles.call({r: ("open", (sid, prompts, owners)) for r in used})

    kept = [[Beam([], row=p)] for p in range(len(prompts))]
    first = True
    while any(not b.done for beams in kept for b in beams):
        # 1. expand: each unfinished beam gets K children (W*K for the prompt itself)
        children = [Child(p, b) for p, beams in enumerate(kept) for b in beams if not b.done
                    for _ in range(W * K if first else K)]
        roles.call({r: ("select", (sid, [c.beam.row for c in children])) for r in used})
        # 2. sample L tokens for every child
        new = sample_chunk(children, L, roles, sid, token_role, guide, gens, decode, stopper)
        # 3. score every child's prefix
        scores = score_children(children, new, method, roles, sid, token_role, chunk_role, stopper)
        # 4. keep the top W per prompt, finished beams competing with the children
        kept = keep_top(kept, children, scores, W)
        first = False

    counts = roles.call({r: ("close", (sid,)) for r in used})
    outputs = []
    for p, beams in enumerate(kept):
        best = beams[0]
        outputs.append(SearchOutput(best.tokens, stopper.text(best.tokens), best.score, best.scores,
                                    {r: int(counts[r].get(p, 0)) for r in used}))
    return outputs


def sample_chunk(children, L, roles, sid, token_role, guide, gens, decode, stopper) -> list[list[int]]:
    """Grow each child by up to L tokens; returns the new tokens per child. Children start as copies
    of their beam, whose newest token the models have not seen yet (lazy feeding)."""
    beams = [Beam(list(c.beam.tokens), c.beam.score, c.beam.scores, log_ratio=c.beam.log_ratio) for c in children]
    for c, b in zip(children, beams):
        c.beam = b  # a child now owns its copy; the parent stays reachable through its row
    pending = [[b.tokens[-1]] if b.tokens else [] for b in beams]
    new = [[] for _ in beams]
    rows_of = {}
    for i, c in enumerate(children):
        rows_of.setdefault(c.prompt, []).append(i)
    for _ in range(L):
        live = [i for i, b in enumerate(beams) if not b.done]
        if not live:
            break
        calls = {"base": ("next", (sid, pending))}
        if token_role:
            calls[token_role] = ("next", (sid, pending))
        out = roles.call(calls)
        logits = torch.as_tensor(out["base"])
        z = upcast(logits) if guide is None else guide(logits, torch.as_tensor(out[token_role]).to(logits.device))
        uniforms = torch.zeros(len(beams), dtype=torch.float64)
        for p, rows in rows_of.items():  # a prompt draws while any of its rows is live
            if any(not beams[i].done for i in rows):
                uniforms[rows] = torch.rand(len(rows), generator=gens[p], dtype=torch.float64)
        tokens = sample(z, uniforms, decode).tolist()
        value = torch.as_tensor(out[token_role]) if token_role else None
        picked = value.gather(-1, torch.tensor(tokens, device=value.device)[:, None]).squeeze(-1).tolist() if token_role else None
        pending = [[] for _ in beams]
        for i in live:
            b = beams[i]
            b.tokens.append(tokens[i])
            new[i].append(tokens[i])
            if token_role == "implicit":
                b.log_ratio += picked[i]
            elif token_role == "explicit":
                b.last_q = picked[i]
            b.done = stopper.done(b.tokens)
            if not b.done:
                pending[i] = [tokens[i]]
    return new


def score_children(children, new, method, roles, sid, token_role, chunk_role, stopper) -> list[float]:
    """The chunk-level value of each child's whole prefix, times beta_chunk."""
    beams = [c.beam for c in children]
    if chunk_role is None:
        return [0.0] * len(beams)
    if chunk_role == token_role == "implicit":  # reuse the log-ratios computed while sampling
        values = [b.log_ratio for b in beams]
    elif chunk_role == token_role == "explicit":  # Q of the newest token, computed while sampling
        values = [b.last_q for b in beams]
    else:
        texts = [stopper.text(b.tokens) for b in beams]
        values = roles.call({chunk_role: ("chunk", (sid, new, texts))})[chunk_role]
    return [method.beta_chunk * float(v) for v in values]


def keep_top(kept, children, scores, W) -> list[list[Beam]]:
    """Per prompt, the W best of (finished kept beams + new children); ties keep the earlier one."""
    by_prompt = [[b for b in beams if b.done] for beams in kept]
    for row, (c, s) in enumerate(zip(children, scores)):
        c.beam.score, c.beam.scores, c.beam.row = s, c.beam.scores + [s], row
        by_prompt[c.prompt].append(c.beam)
    return [sorted(cands, key=lambda b: -b.score)[:W] for cands in by_prompt]
