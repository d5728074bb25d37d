"""The token-wise value formulas and the guidance that adds them to the base logits.

  implicit value   v(s, .) = log pi_tuned(. | s) - log pi_untuned(. | s)       (EFT)
  explicit value   v(s, .) = Q(s, .), a token reward model's head               (FUDGE)
  guidance         z = logits_base + beta * v(s, .)

Inputs are (rows, V) tensors computed by the roles (ivg/values.py); no model runs here. Arithmetic is
in float32 at least (half precision is upcast, float64 stays), as the paper's code combines logits.
"""

import math

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 for the arithmetic of guidance and sampling; float64 stays."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_rows(where: str, *tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or tensors[0].dim() != 2:
        raise ValueError(f"{where}: expected (rows, vocab) tensors of one shape, got {[tuple(t.shape) for t in tensors]}")


def implicit_value(tuned_logits: torch.Tensor, untuned_logits: torch.Tensor) -> torch.Tensor:
    """(rows, V) log pi_tuned - log pi_untuned over the vocabulary."""
    _check_rows("implicit_value", tuned_logits, untuned_logits)
    return torch.log_softmax(upcast(tuned_logits), -1) - torch.log_softmax(upcast(untuned_logits), -1)


def explicit_value(q: torch.Tensor) -> torch.Tensor:
    """(rows, V) Q(s, .) of a token reward model: its head's outputs are the value as they are."""
    _check_rows("explicit_value", q)
    return upcast(q)


class TokenGuidance:
    """z = logits_base + beta * value."""

    def __init__(self, beta: float):
        if not math.isfinite(beta):
            raise ValueError(f"beta_token must be finite, got {beta}")
        self.beta = beta

    def __call__(self, base_logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        _check_rows("TokenGuidance", base_logits, value)
        return upcast(base_logits) + self.beta * value.to(base_logits.device)
