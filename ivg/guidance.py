"""Token-wise guidance: one formula per processor, `__call__(base_logits, value) -> logits`.

The value vectors are computed by the roles (ivg/values.py) and passed in; no model runs here.
"""

import math

import torch

from ivg.sampling import upcast


class TokenGuidance:
    """z = logits_base + beta * value: the value vector says which guidance this is."""

    def __init__(self, beta: float):
        if not math.isfinite(beta):
            raise ValueError(f"beta_token must be finite, got {beta}")
        self.beta = beta

    def __call__(self, base_logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return upcast(base_logits) + self.beta * value


class ImplicitTokenGuidance(TokenGuidance):
    """EFT / implicit value: value = log pi_tuned - log pi_untuned over the vocabulary."""


class ExplicitTokenGuidance(TokenGuidance):
    """FUDGE-style explicit value: value = Q(s, .) from a token reward model."""


def token_guidance(kind: str, beta: float):
    """The processor of a method's token-wise cell; None for unguided sampling."""
    if kind == "none":
        return None
    return {"implicit": ImplicitTokenGuidance, "explicit": ExplicitTokenGuidance}[kind](beta)
