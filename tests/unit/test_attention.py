"""ivg.attention: masked multi-token GQA on CPU without repeat_kv, with the outputs of transformers' sdpa
(to rounding: torch.testing's default tolerance per dtype)."""

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from transformers import LlamaConfig, LlamaForCausalLM

from ivg.attention import NAME
from ivg.cache import InPlaceCache, cache_kwargs
from ivg.config import ModelSpec
from ivg.models import load


def forward_twice(model, impl: str):
    """Prefill a left-padded batch, then feed 3 tokens per row with the cache: both outputs."""
    model.set_attn_implementation(impl)
    body, cache = model.model, InPlaceCache()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask[3, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        first = body(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(body, cache)).last_hidden_state
        new = torch.randint(3, 40, (4, 3), generator=g)
        positions = positions[:, -1:] + torch.arange(1, 4)
        mask = torch.cat([mask, torch.ones(4, 3, dtype=torch.long)], 1)
        second = body(input_ids=new, attention_mask=mask, position_ids=positions, **cache_kwargs(body, cache)).last_hidden_state
    return first, second


def gqa_model(dtype: torch.dtype):
    """4 query heads over 2 key/value heads: a wrong head-to-group mapping changes the outputs."""
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_attention_matches_sdpa_without_repeating_the_cache(monkeypatch, dtype):
    model = gqa_model(dtype)
    repeats = []
    inner = hf_sdpa.repeat_kv
    monkeypatch.setattr(hf_sdpa, "repeat_kv", lambda x, n: repeats.append(n) or inner(x, n))
    expected = forward_twice(model, "sdpa")
    assert repeats, "transformers' sdpa no longer repeats keys here: ivg.attention has nothing to do"
    repeats.clear()
    got = forward_twice(model, NAME)
    assert not repeats
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_only_decoding_models_switch_attention():
    assert load(ModelSpec("tiny-b:base"), decoding=True).model.config._attn_implementation == NAME
    assert load(ModelSpec("tiny-b:base"), decoding=False).model.config._attn_implementation == "sdpa"
    assert load(ModelSpec("tiny:base"), decoding=True).model.config._attn_implementation == NAME  # GPT-2: no GQA,
    # so sdpa_gqa hands every call to transformers' sdpa
