"""Pieces the trainers share: the token RM's Q head, saving a trained model."""

from pathlib import Path

import torch


def attach_q_head(model) -> torch.nn.Linear:
    """Replace the LM head by a fresh, untied Linear(hidden, vocab) at zero (Q(s, .) = 0 until its weights
    are set); the body's input embeddings stay as they are."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=False, device=old.weight.device)
    torch.nn.init.zeros_(head.weight)
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)
    return head


def save_model(model, tokenizer, out_dir) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    return out_dir
