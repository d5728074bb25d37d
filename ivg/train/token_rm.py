"""The FUDGE-style token reward model: an LM body with a Linear(hidden, vocab) head, Q(s_<t, a_t)."""

import dataclasses
import math
import random
from pathlib import Path
from typing import Callable

import torch

from ivg.config import ModelSpec
from ivg.models import load
from ivg.train.config import TrainSettings
from ivg.train.heads import attach_q_head, lora_config, save_model
from ivg.train.pairs import response_scores


def train_token_rm(init: ModelSpec, encoded: list[dict], out_dir, settings: TrainSettings,
                   log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """FUDGE-style token RM: for every response prefix, Q(s_<t, a_t) is trained as the logit of "this
    response is the gold-chosen one of its pair" (BCE, chosen = 1, rejected = 0, each sequence weighted
    equally). Q of a whole response's last token then orders pairs like the gold."""
    loaded = load(dataclasses.replace(init, kind="causal_lm", dtype="float32"))
    model = loaded.model
    head = attach_q_head(model)
    if settings.lora_r:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(settings))
        head.weight.requires_grad_(True)  # PEFT froze everything but the adapters; the head is new
    model.eval()  # no dropout, as TRL does for DPO; gradients flow all the same
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.rm_lr, weight_decay=0.0)
    examples = [((x["prompt_ids"], x[side]), float(side == "chosen_ids"))
                for x in encoded for side in ("chosen_ids", "rejected_ids")]
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    losses, steps = [], settings.epochs * math.ceil(len(examples) / settings.batch_size)
    for _ in range(settings.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), settings.batch_size):
            batch = [examples[i] for i in order[start:start + settings.batch_size]]
            q, resp = response_scores(model, [e for e, _ in batch], log_probs=False)  # (B, T-1)
            y = torch.tensor([label for _, label in batch], device=q.device)[:, None].expand_as(q)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(q, y, reduction="none")
            loss = ((bce * resp).sum(-1) / resp.sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            log(f"  token rm step {len(losses)}/{steps} loss {losses[-1]:.4f}")
    model = model.merge_and_unload() if settings.lora_r else model
    stats = {"steps": len(losses), "loss_first": losses[0] if losses else None,
             "loss_last": losses[-1] if losses else None}
    return save_model(model, loaded.tokenizer, out_dir), stats


