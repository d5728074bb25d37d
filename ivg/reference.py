"""A deliberately naive reference decoder: one prompt at a time, no caches, everything recomputed.

An oracle for the engine, written from the formulas of DESIGN.md and sharing none of its decoding
code (it imports nothing from ivg.sampling, ivg.guidance, ivg.search or ivg.values; only model
loading and prompt templating, ivg.models). Every next-token vector and every chunk value comes from
a full forward over the whole sequence; the warpers, the inverse-CDF draw, the per-prompt uniform
stream, the stop rule, the response text and the guidance formulas are written again here. Agreeing
with it token for token checks the engine's batching, padding, caches, forking, incremental
scoring, re-tokenization, and its sampling and stopping too.

Exact agreement assumes float64 models (the tests' tiny ones): both sides then compute in float64
and differ only in summation order, far below any sampling boundary a test meets.
"""

import hashlib

import torch

from ivg.config import AUTO, DecodeConfig, MethodConfig
from ivg.models import LoadedModel, prompt_ids

# ---------------------------------------------------------------- randomness: one stream per prompt


def uniform_stream(seed: int, prompt_id: str) -> torch.Generator:
    """The engine's documented rule: sha256 of f"{seed}\\x00{prompt_id}", its first 8 bytes read
    little-endian, mod 2**63, seed a torch.Generator; each step draws one float64 uniform per row."""
    digest = hashlib.sha256(str(seed).encode() + b"\x00" + prompt_id.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (1 << 63))


# ---------------------------------------------------------------- sampling, from the formulas


def softmax(z: torch.Tensor) -> torch.Tensor:
    """exp(z - max z) / sum exp(z - max z) over a (V,) vector; -inf entries get probability 0."""
    e = torch.exp(z - z.max())
    return e / e.sum()


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """z - max z - log sum exp(z - max z), over the last dim."""
    shifted = z - z.max(-1, keepdim=True).values
    return shifted - torch.log(torch.exp(shifted).sum(-1, keepdim=True))


def top_k(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep every token whose logit is >= the k-th largest (ties at the k-th value all stay, as in
    HF's TopKLogitsWarper); the others get -inf."""
    if k >= len(z):
        return z
    kth = sorted(z.tolist(), reverse=True)[k - 1]
    return torch.where(z >= kth, z, torch.tensor(float("-inf"), dtype=z.dtype))


def top_p(z: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus, with HF's TopPLogitsWarper's threshold: from the least likely token up, a token whose
    running probability sum is still <= 1 - p goes; the most likely always stays. Equal logits are
    walked in torch.sort's order (it is not a stable sort), the order HF's warper sees them in."""
    order = torch.sort(z).indices  # ascending
    remove = torch.cumsum(softmax(z[order]), 0) <= 1 - p
    remove[-1] = False
    out = z.clone()
    out[order[remove]] = float("-inf")
    return out


def draw(z: torch.Tensor, u: float, decode: DecodeConfig) -> int:
    """One token from guided logits z (V,): temperature -> top-k -> top-p -> softmax, then the first
    token whose cumulative probability exceeds u * total (the inverse CDF). Temperature 0: argmax."""
    z = z.double()
    if decode.temperature == 0:
        return int(max(range(len(z)), key=lambda i: (z[i].item(), -i)))  # the first of equal maxima
    z = z / decode.temperature
    if decode.top_k > 0:
        z = top_k(z, decode.top_k)
    if decode.top_p < 1:
        z = top_p(z, decode.top_p)
    cdf = torch.cumsum(softmax(z), 0)
    above = (cdf > u * cdf[-1]).nonzero()
    return int(above[0]) if len(above) else len(z) - 1


# ---------------------------------------------------------------- stopping and the response text


class Stop:
    """When a response stops, whether it ended by itself, and its text, from the decode settings."""

    def __init__(self, tokenizer, decode: DecodeConfig, eos_ids: set[int]):
        self.tokenizer, self.decode = tokenizer, decode
        self.eos = set(eos_ids) if decode.stop_at_eos else set()

    def ended(self, tokens: list[int]) -> bool:
        """On EOS, or a stop string anywhere in the decoded response."""
        if tokens and tokens[-1] in self.eos:
            return True
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in self.decode.stop)

    def text(self, tokens: list[int]) -> str:
        """The response: a final EOS dropped, special tokens skipped, cut before the first stop string."""
        if tokens and tokens[-1] in self.eos:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in self.decode.stop:
            if s in text:
                text = text[:text.index(s)]
        return text


def context_of(m: LoadedModel) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if getattr(m.model.config, name, None):
            return int(getattr(m.model.config, name))
    return None


def room(models: dict, method: MethodConfig, prompt: str) -> int:
    """max_new_tokens: auto — the fewest tokens any model the method uses has left after the prompt."""
    names = ["base"] + [n for g in {method.token, method.chunk} - {"none"}
                        for n in (("tuned", "untuned") if g == "implicit" else ("explicit",))]
    return min(context_of(models[n]) - len(prompt_ids(models[n], prompt)) for n in names if context_of(models[n]))


# ---------------------------------------------------------------- values and guidance


@torch.no_grad()
def _outputs(m: LoadedModel, ids: list[int]) -> torch.Tensor:
    return m.model(torch.tensor([ids], device=m.device)).logits[0].double()  # (T, V) or (num_labels,)


def _shares(m: LoadedModel, base_tok) -> bool:
    return m.tokenizer is base_tok or m.tokenizer.get_vocab() == base_tok.get_vocab()


def _ids(m: LoadedModel, prompt: str, tokens: list[int], text: str, base_tok) -> tuple[list[int], int]:
    """The model's full sequence: its prompt view + the response (ids if it shares the base vocab)."""
    head = prompt_ids(m, prompt)
    tail = tokens if _shares(m, base_tok) else m.tokenizer(text, add_special_tokens=False).input_ids
    return head + list(tail), len(head)


def next_vector(role: str, models: dict, prompt: str, tokens: list[int], base_tok) -> torch.Tensor:
    """(V,) base logits; implicit: log pi_t - log pi_u; explicit: the token RM's Q(s, .)."""
    if role == "implicit":
        t, u = (log_softmax(_outputs(m, _ids(m, prompt, tokens, "", base_tok)[0])[-1])
                for m in (models["tuned"], models["untuned"]))
        return t - u
    m = models[role]
    return _outputs(m, _ids(m, prompt, tokens, "", base_tok)[0])[-1]


def label_weights(config, positive_label: str | None) -> torch.Tensor:
    """A classifier's value = logits @ weights: logit 0 of a scalar RM, or POSITIVE - NEGATIVE."""
    if config.num_labels == 1:
        return torch.ones(1, dtype=torch.float64)
    positive = {str(k).lower(): v for k, v in config.label2id.items()}[positive_label.lower()]
    return torch.tensor([1.0 if i == positive else -1.0 for i in range(2)], dtype=torch.float64)


def chunk_value(role: str, models: dict, prompt: str, tokens: list[int], text: str, base_tok) -> float:
    """The value of the whole response so far: the implicit sum over its tokens of log pi_t - log pi_u;
    the explicit Q of its last token, Q(s_{n-1}, a_n), or a classifier's score of the last token."""
    if role == "implicit":
        total = 0.0
        for sign, m in ((1, models["tuned"]), (-1, models["untuned"])):
            ids, n = _ids(m, prompt, tokens, text, base_tok)
            lp = log_softmax(_outputs(m, ids))
            total += sign * sum(lp[j - 1, ids[j]].item() for j in range(n, len(ids)))
        return total
    m = models["explicit"]
    ids, n = _ids(m, prompt, tokens, text, base_tok)
    if m.spec.kind == "classifier":
        # the head on the last token's hidden state (HF's own pooling would skip sampled pad tokens)
        with torch.no_grad():
            hidden = m.model.base_model(torch.tensor([ids], device=m.device)).last_hidden_state[0, -1]
            logits = m.model.score(hidden).double()
        return float(logits @ label_weights(m.model.config, m.spec.positive_label))
    return _outputs(m, ids)[-2, ids[-1]].item() if len(ids) > n else 0.0


# ---------------------------------------------------------------- the search


def naive_search(models: dict, prompt_id: str, prompt: str, method: MethodConfig, decode: DecodeConfig,
                 eos_ids: set[int], seed: int) -> tuple[list[int], str, float, list[float]]:
    """CBS for one prompt; returns (tokens, response text, score, chunk scores) of the best beam.

    models: base, tuned, untuned, explicit (LoadedModel; only those the method uses are read).
    eos_ids: the tokens that end a response when decode.stop_at_eos."""
    base_tok = models["base"].tokenizer
    stop = Stop(base_tok, decode, eos_ids)
    limit = room(models, method, prompt) if decode.max_new_tokens == AUTO else decode.max_new_tokens
    W, K, L = method.W, method.K, method.L or limit
    copies = K if method.finished == "repeat" else 1  # how often a finished beam enters the next round
    scorer_models = {"implicit": ("tuned", "untuned"), "explicit": ("explicit",)}.get(method.chunk, ())
    gen = uniform_stream(seed, prompt_id)

    def done(tokens):
        return len(tokens) >= limit or stop.ended(tokens)

    kept = [([], 0.0, [], False)]  # (tokens, score, scores, done)
    first = True
    while not all(b[3] for b in kept):
        children = [(list(t), s) for t, _, s, d in kept if not d for _ in range(W * K if first else K)]
        finished = [False] * len(children)
        for _ in range(L):
            if all(finished):
                break
            uniforms = torch.rand(len(children), generator=gen, dtype=torch.float64)
            for i, (tokens, _) in enumerate(children):
                if finished[i]:
                    continue
                z = next_vector("base", models, prompt, tokens, base_tok)
                if method.token != "none":  # z = logits_base + beta * value (DESIGN.md)
                    z = z + method.beta_token * next_vector(method.token, models, prompt, tokens, base_tok)
                tokens.append(draw(z, uniforms[i].item(), decode))
                finished[i] = done(tokens)
        scored = []
        for (tokens, scores), d in zip(children, finished):
            scored_ids = tokens
            if method.score_eos and d and stop.ended(tokens) and tokens[-1] not in stop.eos:
                # ended on a stop string: scored as ending with the base's EOS (in a shared vocabulary)
                assert all(_shares(models[n], base_tok) for n in scorer_models), "score_eos needs a shared vocabulary"
                scored_ids = tokens + [base_tok.eos_token_id]
            value = 0.0 if method.chunk == "none" else chunk_value(
                method.chunk, models, prompt, scored_ids, stop.text(tokens), base_tok)
            score = method.beta_chunk * value
            scored.append((tokens, score, scores + [score], d))
        # finished beams first (ties keep the earlier), once each or repeated K times
        pool = [b for b in kept if b[3] for _ in range(copies)] + scored
        kept = sorted(pool, key=lambda b: -b[1])[:W]
        first = False
    tokens, score, scores, _ = kept[0]
    return tokens, stop.text(tokens), score, scores
