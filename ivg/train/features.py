"""One forward of the frozen untuned model over every sampled response: what both trainers read.

Per response (prompt ids P, response ids R, R >= 1), in float32:
  ref    (R,)      log pi_untuned(a_t | s_<t) of each response token: DPO's reference log-probs, and the
                   untuned half of the implicit value when it is measured
  final  (R, H)    the final (normed) hidden state at each position that predicts a response token: the
                   token RM's features (its body is this frozen model; its head reads these)
  cut    (P+R, H)  the hidden states entering layer `cut` (only if asked): the input of the top-layer
                   DPO (ivg/train/top_layers.py), which then never runs the frozen layers below again

Token ids are the engine's (ivg/train/pairs.py `encode`); sequences are right-padded and run in
batches of similar length, so padding costs little and positions need no adjusting.
"""

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Features:
    prompt_ids: list[int]
    response_ids: list[int]
    ref: torch.Tensor  # (R,) float32
    final: torch.Tensor  # (R, H) float32
    cut: torch.Tensor | None = None  # (P+R, H) float32: the input of layer `cut`

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def pad_right(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, right-padded with id 0 (masked, so its value never matters)."""
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def response_positions(lengths: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of every position that predicts a response token, row by row: for a
    prompt of P and a response of R tokens, columns P-1 .. P+R-2 (output t predicts token t + 1)."""
    rows, cols = [], []
    for i, (P, R) in enumerate(lengths):
        rows += [i] * R
        cols += range(P - 1, P + R - 1)
    return torch.tensor(rows), torch.tensor(cols)


def token_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row: (N, H) states, (N,) ids -> (N,). The head runs only
    on the states asked for (the vocabulary projection is as costly as 8 of SmolLM2's 30 layers)."""
    logits = head(hidden).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (Llama: model.layers, GPT-2: transformer.h)."""
    n = model.config.num_hidden_layers
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not found:
        raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers found")
    return found[0]


@torch.inference_mode()
def featurize(model, examples: list[tuple[list[int], list[int]]], cut: int | None = None, batch: int = 32,
              log: Callable[[str], None] | None = None) -> list[Features]:
    """Features of each (prompt ids, response ids) example, in the order given (see the module doc).
    `model` is a causal LM in float32; every response must have at least one token."""
    if any(not r for _, r in examples):
        raise ValueError("featurize: every response needs at least one token")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    head, out = model.get_output_embeddings(), [None] * len(examples)
    for b, start in enumerate(range(0, len(order), batch)):
        idx = order[start:start + batch]
        ids, mask = pad_right([examples[i][0] + examples[i][1] for i in idx])
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False,
                                  output_hidden_states=cut is not None)
        final = hidden.last_hidden_state.float()  # (B, T, H), after the final norm
        lengths = [(len(examples[i][0]), len(examples[i][1])) for i in idx]
        rows, cols = response_positions(lengths)
        ref = token_logps(head, final[rows, cols], ids[rows, cols + 1])
        at = 0
        for j, i in enumerate(idx):
            P, R = lengths[j]
            out[i] = Features(list(examples[i][0]), list(examples[i][1]), ref[at:at + R].clone(),
                              final[j, P - 1:P + R - 1].clone(),
                              hidden.hidden_states[cut][j, :P + R].float().clone() if cut is not None else None)
            at += R
        if log and b % 25 == 0:
            log(f"  features {start + len(idx)}/{len(examples)}")
    return out
