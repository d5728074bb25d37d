"""The token reward model: the untuned LM's frozen body and a fitted head Linear(hidden, vocab), Q(s, a).

Q(s_<t, a_t) = h_t . W[a_t], h_t the body's final hidden state before token a_t. The head is fitted,
not trained by gradient steps through the body (which did not learn on a few hundred pairs):

1. The value direction w (FUDGE's per-token BCE, with one row shared by every token): each sampled
   response is labelled by how often it beats the other responses to its prompt (win fraction,
   ties left out), and a logistic regression of that label on the hidden state at *every* position of
   the response (each sequence weighted equally, the features standardised, L2 strength 1/C) gives
   V(s) = h . w, the log-odds that the response under way is the better one.
2. The token-wise part: b_a = the mean value increment V(s_<t+1) - V(s_<t) after token a, shrunk
   towards 0 by `shrink` pseudo-counts, added along a direction c on which every state projects to
   about 1 (h . c ~ 1, c by least squares: SmolLM2's normed states have one): W[a] = w + b_a c, so
   Q(s, a) = V(s) + b_a (h . c) ~ V(s) + b_a, the value after a. Under token-wise guidance
   z = logits + beta Q(s, .), V(s) shifts every token alike (no effect after the softmax) and b_a
   favours tokens that raised the value in the data; a token never seen has b_a = 0: neutral.
   Chunk-level, Q of the last token orders responses like V. V keeps the constant offset mean(h) . w
   (about 0.2 on SmolLM2, against a spread of 0.5), which no ranking sees.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ivg.train.config import TokenRMSettings
from ivg.train.features import Features


@dataclass
class Scored:
    features: Features
    gold: float


def win_fractions(group: list[Scored]) -> list[float | None]:
    """Per response, the fraction of the other responses to its prompt it beats on gold; ties are left
    out, and a response that ties all the others gets None (it says nothing about better or worse)."""
    out = []
    for x in group:
        others = [y.gold for y in group if y is not x and y.gold != x.gold]
        out.append(sum(x.gold > g for g in others) / len(others) if others else None)
    return out


def fit_head(groups: list[list[Scored]], vocab_size: int, settings: TokenRMSettings, log=print) -> tuple[np.ndarray, dict]:
    """(vocab, hidden) head weights W[a] = w + b_a c fitted to the training groups (see the module doc)."""
    from sklearn.linear_model import LogisticRegression

    seqs, labels = [], []
    for group in groups:
        for x, y in zip(group, win_fractions(group)):
            if y is not None:
                seqs.append(x.features)
                labels.append(y)
    if not seqs:
        raise ValueError("token RM: no response beats or loses to another of its prompt (all ties)")
    X = torch.cat([f.final for f in seqs]).double().numpy()  # (N, H): every response position
    lengths = np.array([len(f.response_ids) for f in seqs])
    y = np.repeat(labels, lengths)
    weight = np.repeat(1.0 / lengths, lengths)  # each sequence counts once, whatever its length

    # 1. A soft label y is BCE(y) = y * BCE(1) + (1 - y) * BCE(0): every row twice, weighted.
    std = X.std(0) + 1e-6
    Z = (X - X.mean(0)) / std
    w2 = np.r_[weight * y, weight * (1 - y)]
    fit = LogisticRegression(C=settings.C, max_iter=settings.max_iter).fit(
        np.concatenate([Z, Z]), np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=w2 * len(w2) / w2.sum())
    w = fit.coef_[0] / std  # on raw states; the intercept is a constant, invisible to any ranking

    # 2. c with h . c ~ 1 (ridge least squares), and b_a: the shrunk mean increment of V = h . w
    # after token a (the last token's is never observed).
    H = X.shape[1]
    c = np.linalg.solve(X.T @ X + 1e-3 * np.eye(H), X.T @ np.ones(len(X)))
    hc = X @ c
    sums, counts = np.zeros(vocab_size), np.zeros(vocab_size)
    for f in seqs:
        v = f.final.double().numpy() @ w  # (R,) V before each response token
        ids = np.array(f.response_ids[:-1], dtype=np.int64)
        np.add.at(sums, ids, v[1:] - v[:-1])
        np.add.at(counts, ids, 1)
    bias = np.where(counts > 0, sums / np.maximum(counts + settings.shrink, 1e-12), 0.0)
    W = w[None, :] + bias[:, None] * c[None, :]  # (V, H)
    stats = {"sequences": len(seqs), "positions": int(len(X)), "tokens_seen": int((counts > 0).sum()),
             "h_dot_c_mean": float(hc.mean()), "h_dot_c_std": float(hc.std()),
             "value_std": float((X @ w).std()), "bias_abs_max": float(np.abs(bias).max())}
    log(f"  token rm: fitted on {len(seqs)} responses ({len(X)} positions); h.c = {hc.mean():.4f} +- {hc.std():.4f}; "
        f"{stats['tokens_seen']} tokens with a bias")
    return W.astype(np.float32), stats


def q_last(W: torch.Tensor, f: Features) -> float:
    """Q of a response's last token, Q(s_<R, a_R) = h . W[a_R]: the chunk-level value of the whole response."""
    return float(f.final[-1].double() @ W[f.response_ids[-1]].double())
