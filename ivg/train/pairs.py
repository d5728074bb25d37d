"""Preference pairs from the untuned model itself, ordered by the gold reward, and how well a value orders them.

Both trainers see exactly the token ids the engine feeds at decode time: the prompt as the model's own
view (`ivg.models.prompt_ids`: its template, its special tokens) followed by the response tokenized
alone, no EOS appended (the implicit value sums over response tokens; the search scores prefixes).
"""

from typing import Callable

import torch

from ivg.config import DecodeConfig, GenerationConfig, MethodConfig, ModelSpec, Models
from ivg.engine import Engine
from ivg.models import prompt_ids

Gold = Callable[[list[str], list[str]], list[float]]  # (prompts, responses) -> scores


def sample_pairs(untuned: ModelSpec, prompts: list[str], n_pairs: int, max_new_tokens: int,
                 temperature: float, seed: int, stop: tuple[str, ...] = (), batch: int = 64,
                 tag: str = "") -> list[dict]:
    """n_pairs pairs of responses per prompt, plain sampling from the untuned model, in prompt order.

    The engine seeds each row from (seed, row id), the id being `tag/prompt index/pair/side`, so a pair
    is the same whatever the batch it runs in or the other pairs sampled with it; another `tag` (the
    held-out prompts) gives other random streams for the same seed."""
    config = GenerationConfig(models=Models(base=untuned), seed=seed,
                              decode=DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop))
    engine = Engine.local(config)
    rows = [{"id": f"{tag}/{i}/{j}/{side}", "prompt": p}
            for i, p in enumerate(prompts) for j in range(n_pairs) for side in "ab"]
    out = []
    for start in range(0, len(rows), batch):
        out += engine.run(rows[start:start + batch], MethodConfig())
    failed = [r for r in out if r["status"] != "ok"]
    if failed:
        raise ValueError(f"{len(failed)} sampling rows failed, first: {failed[0]['id']}: {failed[0]['error']}")
    return [{"prompt": a["prompt"], "a": a["response"], "b": b["response"]} for a, b in zip(out[::2], out[1::2])]


def label_pairs(pairs: list[dict], gold: Gold) -> list[dict]:
    """Order each pair by the gold reward. A tie teaches nothing and an empty response gives the token RM
    no prefix to score, so those pairs are dropped."""
    prompts = [p["prompt"] for p in pairs]
    scores = gold(prompts + prompts, [p["a"] for p in pairs] + [p["b"] for p in pairs])
    if len(scores) != 2 * len(pairs):
        raise ValueError(f"the gold returned {len(scores)} scores for {2 * len(pairs)} responses")
    out = []
    for p, sa, sb in zip(pairs, scores[:len(pairs)], scores[len(pairs):]):
        if sa == sb or not p["a"] or not p["b"]:
            continue
        chosen, rejected = (p["a"], p["b"]) if sa > sb else (p["b"], p["a"])
        out.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "margin": abs(sa - sb)})
    return out


def score_responses(pairs: list[dict], gold: Gold) -> list[dict]:
    """Every response of the sampled pairs with its gold score: {prompt, response, gold}, a before b."""
    prompts = [p["prompt"] for p in pairs for _ in "ab"]
    responses = [p[side] for p in pairs for side in "ab"]
    scores = gold(prompts, responses)
    if len(scores) != len(responses):
        raise ValueError(f"the gold returned {len(scores)} scores for {len(responses)} responses")
    return [{"prompt": p, "response": r, "gold": float(g)} for p, r, g in zip(prompts, responses, scores)]


def encode(loaded, labelled: list[dict]) -> list[dict]:
    """Token ids as the engine feeds them: the model's prompt view, then the response alone."""
    tok = loaded.tokenizer
    return [{"prompt_ids": prompt_ids(loaded, x["prompt"]),
             "chosen_ids": tok(x["chosen"], add_special_tokens=False).input_ids,
             "rejected_ids": tok(x["rejected"], add_special_tokens=False).input_ids} for x in labelled]


def response_scores(model, examples: list[tuple[list[int], list[int]]], log_probs: bool):
    """Per example (prompt ids, response ids): each response token's entry in the output just before it,
    log pi(a_t | s_<t) if log_probs else the raw output (the token RM's Q(s_<t, a_t)).

    Returns (B, T-1) scores and a (B, T-1) mask of the response positions; right-padded, so positions
    need no adjusting."""
    device = next(model.parameters()).device
    seqs = [p + r for p, r in examples]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    resp = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for i, ((p, r), s) in enumerate(zip(examples, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        resp[i, len(p) - 1:len(s) - 1] = True  # output t predicts token t + 1
    ids, mask, resp = ids.to(device), mask.to(device), resp.to(device)
    out = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    if log_probs:
        out = out.log_softmax(-1)
    return out[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), resp


@torch.inference_mode()
def pair_values(model, encoded: list[dict], kind: str, batch: int = 16) -> list[tuple[float, float]]:
    """(chosen, rejected) per pair: kind "logp" = sum of response log-probs, "q" = Q of the last token."""
    out = []
    for start in range(0, len(encoded), batch):
        rows = encoded[start:start + batch]
        examples = [(x["prompt_ids"], x[side]) for side in ("chosen_ids", "rejected_ids") for x in rows]
        scores, resp = response_scores(model, examples, log_probs=kind == "logp")
        if kind == "logp":
            values = (scores * resp).sum(-1)
        else:
            last = resp.long().cumsum(-1).argmax(-1)  # the last response position
            values = scores[torch.arange(len(examples)), last]
        values = values.tolist()
        out += list(zip(values[:len(rows)], values[len(rows):]))
    return out


def accuracy(values: list[tuple[float, float]]) -> float | None:
    """How often the values order a pair as the gold does (a tie counts as wrong)."""
    return sum(c > r for c, r in values) / len(values) if values else None
