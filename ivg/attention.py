"""Grouped-query attention that does not copy the KV cache, on CPU.

transformers' `sdpa` attention repeats a GQA model's keys and values once per query head
(`repeat_kv`: a copy of the layer's whole cache) whenever a mask is given and more than one query
token is fed. Here that is every prefill and every chunk scored, since left padding needs a mask. On
CUDA the copy is the right call (SDPA's fused kernels take no GQA with a mask); on CPU torch's own
kernel takes `enable_gqa` with a mask, with outputs equal to the copy's (tests/unit/test_attention.py)
and none of its cost: at 110 cached tokens the copy was about a quarter of a 16-row, 5-token SmolLM2
forward (README, "What limits the numbers").
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "ivg_sdpa_gqa"


def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """`sdpa`, except masked multi-token GQA on CPU: one kernel call over the key/value heads."""
    if (getattr(module, "num_key_value_groups", 1) == 1 or query.shape[2] == 1 or attention_mask is None
            or query.device.type != "cpu" or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("sdpa attention does not support softcap")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)  # a mask given: never is_causal
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, sdpa_gqa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets (unregistered names get none)


def use_gqa_attention(model: torch.nn.Module) -> None:
    """Switch a model that attends with `sdpa` on CPU to `sdpa_gqa`; others are left as they are."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and next(model.parameters()).device.type == "cpu":
        model.set_attn_implementation(NAME)
