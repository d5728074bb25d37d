"""DPO on cached features: the tuned model, numerator of the implicit value log pi_tuned - log pi_untuned.

Each training prompt brings all its sampled responses, ranked by the gold (a `Ranking`), and the loss
is DPO's ranking form (Rafailov et al. 2023, appendix A.3: the Plackett-Luce model of the ranking
with the implicit reward as score):

    r(y)  = log pi(y | x) - log pi_untuned(y | x)            summed over the response's tokens
    loss  = -sum_k log( exp(beta r(y_k)) / sum_{j >= k} exp(beta r(y_j)) )     y_1 best, ..., y_K worst

For K = 2 that is DPO's sigmoid loss -log sigmoid(beta (r(chosen) - r(rejected))); with 4 responses
per prompt it uses every response sampled (4 responses cost what 2 pairs do, and carry 6 orderings).
pi_untuned's log-probs are the features' `ref` (computed once); pi is the untuned model with its top
layers trainable (ivg/train/top_layers.py). AdamW at a constant learning rate. Optionally, every
`eval_every` steps the implicit reward's accuracy on validation pairs (prompts never trained on) is
measured and the best state kept: early stopping, for runs long enough to memorise.
"""

import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ivg.train.config import DPOSettings
from ivg.train.features import Features
from ivg.train.top_layers import TopLayers


@dataclass
class Pair:
    chosen: Features
    rejected: Features
    margin: float  # gold(chosen) - gold(rejected) > 0


@dataclass
class Ranking:
    """One prompt's responses, best first by gold (at least two, no two with the same gold or ids)."""

    responses: list[Features]


def ranking_loss(r: torch.Tensor) -> torch.Tensor:
    """-log P(the order best first) under Plackett-Luce with scores r (K,), best first."""
    rest = torch.logcumsumexp(r.flip(0), 0).flip(0)  # logsumexp of r[k:]
    return -(r - rest)[:-1].sum()


@torch.no_grad()
def implicit_rewards(policy: TopLayers, pairs: list[Pair], batch: int = 32) -> list[tuple[float, float]]:
    """(r(chosen), r(rejected)) per pair, r = log pi - log pi_untuned summed over the response."""
    out = []
    for start in range(0, len(pairs), batch):
        rows = pairs[start:start + batch]
        feats = [p.chosen for p in rows] + [p.rejected for p in rows]
        r = (policy.response_logps(feats) - torch.stack([f.ref.sum() for f in feats])).tolist()
        out += list(zip(r[:len(rows)], r[len(rows):]))
    return out


def pair_accuracy(rewards: list[tuple[float, float]]) -> float | None:
    return sum(c > r for c, r in rewards) / len(rewards) if rewards else None


def train_dpo(full, train: list[Ranking], val: list[Pair], settings: DPOSettings,
              log: Callable[[str], None] = print):
    """DPO from the untuned model `full` (float32, left unchanged) on `train`, `batch_size` prompts a step;
    returns (the trained TopLayers, stats): `policy.merged_into(copy of full)` is the tuned model."""
    s = settings
    torch.manual_seed(s.seed)
    policy = TopLayers(full, s.layers)
    stats = {"exactness_gap": policy.check_exact([g.responses[0] for g in train[:8]]), "history": []}
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(train) // s.batch_size)
    total = s.epochs * steps_per_epoch
    eval_every = s.eval_every or steps_per_epoch
    rng = random.Random(s.seed)
    trained = lambda: {k: v.detach().clone() for k, v in policy.state_dict().items() if "layers" in k}
    # Before training the implicit reward is 0 for every response (tuned = untuned): every pair ties,
    # accuracy 0 by definition (measured, float noise of ~1e-6 would order pairs at random).
    best = {"step": 0, "val_accuracy": 0.0 if val else None, "state": trained() if val else None}
    step, losses, start = 0, [], time.perf_counter()

    def evaluate():
        nonlocal best
        point = {"step": step, "loss": sum(losses[-eval_every:]) / len(losses[-eval_every:]),
                 "val_accuracy": pair_accuracy(implicit_rewards(policy, val)) if val else None,
                 "seconds": round(time.perf_counter() - start, 1)}
        stats["history"].append(point)
        log(f"  dpo step {step}/{total} " + " ".join(f"{k} {v:.4g}" for k, v in point.items()
                                                      if isinstance(v, float) and k != "seconds"))
        if val and point["val_accuracy"] > best["val_accuracy"]:  # strictly better: ties keep the earlier
            best = {"step": step, "val_accuracy": point["val_accuracy"], "state": trained()}
        return point

    for epoch in range(s.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for at in range(0, len(order), s.batch_size):
            rows = [train[i] for i in order[at:at + s.batch_size]]
            feats = [f for g in rows for f in g.responses]
            r = s.beta * (policy.response_logps(feats) - torch.stack([f.ref.sum() for f in feats]))
            loss = torch.stack([ranking_loss(x) for x in r.split([len(g.responses) for g in rows])]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % eval_every == 0 or step == total:
                point = evaluate()
                if val and s.patience and point["step"] - best["step"] >= s.patience * eval_every:
                    log(f"  dpo: no better validation accuracy for {s.patience} evaluations: stop")
                    break
        else:
            continue
        break
    if val:  # the best state seen (step 0: training never beat the untuned model on the validation pairs)
        policy.load_state_dict(best["state"], strict=False)
    stats.update(steps=step, kept_step=best["step"] if val else step, kept_val_accuracy=best["val_accuracy"],
                 loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                 seconds=round(time.perf_counter() - start, 1))
    return policy, stats
