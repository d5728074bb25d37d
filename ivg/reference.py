"""A deliberately naive reference decoder: one prompt at a time, no caches, everything recomputed.

Every next-token vector and every chunk value comes from a full forward over the whole sequence,
straight from the formulas of DESIGN.md. It shares only the pure pieces with the engine (the RNG
stream per prompt, the warpers, the stop rule), so agreeing with it token for token checks the
engine's batching, padding, caches, forking, incremental scoring and re-tokenization.
"""

import torch

from ivg.config import DecodeConfig, MethodConfig
from ivg.models import LoadedModel, prompt_ids
from ivg.sampling import Stopper, prompt_generator, sample
from ivg.values import classifier_weights


@torch.no_grad()
def _outputs(m: LoadedModel, ids: list[int]) -> torch.Tensor:
    return m.model(torch.tensor([ids], device=m.device)).logits[0]  # (T, V) or (num_labels,)


def _ids(m: LoadedModel, prompt: str, tokens: list[int], text: str, base_tok) -> tuple[list[int], int]:
    """The model's full sequence: its prompt view + the response (ids if it shares the base vocab)."""
    head = prompt_ids(m, prompt)
    shares = m.tokenizer is base_tok or m.tokenizer.get_vocab() == base_tok.get_vocab()
    tail = tokens if shares else m.tokenizer(text, add_special_tokens=False).input_ids
    return head + list(tail), len(head)


def next_vector(role: str, models: dict, prompt: str, tokens: list[int], base_tok) -> torch.Tensor:
    if role == "implicit":
        lp = [torch.log_softmax(_outputs(m, _ids(m, prompt, tokens, "", base_tok)[0])[-1], -1)
              for m in (models["tuned"], models["untuned"])]
        return lp[0] - lp[1]
    m = models[role]  # base logits, or the token reward model's Q(s, .)
    return _outputs(m, _ids(m, prompt, tokens, "", base_tok)[0])[-1]


def chunk_value(role: str, models: dict, prompt: str, tokens: list[int], text: str, base_tok) -> float:
    if role == "implicit":
        total = 0.0
        for sign, m in ((1, models["tuned"]), (-1, models["untuned"])):
            ids, n = _ids(m, prompt, tokens, text, base_tok)
            lp = torch.log_softmax(_outputs(m, ids), -1)
            total += sign * sum(lp[j - 1, ids[j]].item() for j in range(n, len(ids)))
        return total
    m = models["explicit"]
    ids, n = _ids(m, prompt, tokens, text, base_tok)
    if m.spec.kind == "classifier":
        # the head on the last token's hidden state (HF's own pooling would skip sampled pad tokens)
        with torch.no_grad():
            hidden = m.model.base_model(torch.tensor([ids], device=m.device)).last_hidden_state[0, -1]
            logits = m.model.score(hidden)
        return float(logits @ classifier_weights(m.model.config, m.spec.positive_label).to(logits))
    return _outputs(m, ids)[-2, ids[-1]].item() if len(ids) > n else 0.0  # Q(s_{n-1}, a_n)


def naive_search(models: dict, prompt_id: str, prompt: str, method: MethodConfig, decode: DecodeConfig,
                 stopper: Stopper, seed: int) -> tuple[list[int], float, list[float]]:
    """CBS for one prompt; returns (tokens, score, chunk scores) of the best beam."""
    base_tok = models["base"].tokenizer
    W, K, L = method.W, method.K, method.L or decode.max_new_tokens
    gen = prompt_generator(seed, prompt_id)
    kept = [([], 0.0, [], False)]  # (tokens, score, scores, done)
    first = True
    while not all(b[3] for b in kept):
        children = [(list(t), s) for t, _, s, d in kept if not d for _ in range(W * K if first else K)]
        done = [False] * len(children)
        for _ in range(L):
            if all(done):
                break
            uniforms = torch.rand(len(children), generator=gen, dtype=torch.float64)
            for i, (tokens, _) in enumerate(children):
                if done[i]:
                    continue
                z = next_vector("base", models, prompt, tokens, base_tok)
                if method.token != "none":  # z = logits_base + beta * value (DESIGN.md)
                    z = z + method.beta_token * next_vector(method.token, models, prompt, tokens, base_tok)
                tokens.append(int(sample(z[None], uniforms[i:i + 1], decode)[0]))
                done[i] = stopper.done(tokens)
        scored = []
        for (tokens, scores), d in zip(children, done):
            value = 0.0 if method.chunk == "none" else chunk_value(
                method.chunk, models, prompt, tokens, stopper.text(tokens), base_tok)
            score = method.beta_chunk * value
            scored.append((tokens, score, scores + [score], d))
        kept = sorted([b for b in kept if b[3]] + scored, key=lambda b: -b[1])[:W]
        first = False
    return kept[0][0], kept[0][1], kept[0][2]
