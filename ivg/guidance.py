"""Token-wise guidance: one formula per processor, `__call__(base_logits, value) -> logits`.

The value vectors are computed by the roles (ivg/values.py) and passed in; no model runs here.
"""

import math

import torch

from ivg.sampling import upcast


class ImplicitTokenGuidance:
    """EFT / implicit value: z = logits_base + beta * (log pi_tuned - log pi_untuned)."""

    def __init__(self, beta: float):
        if not math.isfinite(beta):
            raise ValueError(f"beta_token must be finite, got {beta}")
        self.beta = beta

    def __call__(self, base_logits: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
        return upcast(base_logits) + self.beta * log_ratio


class ExplicitTokenGuidance:
    """FUDGE-style explicit value: z = logits_base + beta * Q(s, .) from a token reward model."""

    def __init__(self, beta: float):
        if not math.isfinite(beta):
            raise ValueError(f"beta_token must be finite, got {beta}")
        self.beta = beta

    def __call__(self, base_logits: torch.Tensor, q_values: torch.Tensor) -> torch.Tensor:
        return upcast(base_logits) + self.beta * q_values


def token_guidance(kind: str, beta: float):
    """The processor of a method's token-wise cell; None for unguided sampling."""
    if kind == "none":
        return None
    return {"implicit": ImplicitTokenGuidance, "explicit": ExplicitTokenGuidance}[kind](beta)
