"""Pieces both trainers share: LoRA settings, the token RM's Q head, saving a trained model."""

from pathlib import Path

import torch

from ivg.train.config import TrainSettings


def lora_config(settings: TrainSettings):
    from peft import LoraConfig

    # all-linear: every Linear/Conv1D of the body (PEFT leaves the output layer out)
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def attach_q_head(model) -> torch.nn.Linear:
    """Replace the LM head by a fresh, untied Linear(hidden, vocab) at zero: Q(s, .) = 0 everywhere until
    trained, so a token the data never showed stays neutral under token-wise guidance."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=False, device=old.weight.device)
    torch.nn.init.zeros_(head.weight)
    model.config.tie_word_embeddings = False  # the body's input embeddings stay as they are
    model.set_output_embeddings(head)
    return head


def save_model(model, tokenizer, out_dir) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    return out_dir


