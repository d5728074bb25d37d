"""Dynamic batching in the model servers: sessions of different searches merged into one forward,
with exactly the outputs (and caches) each session would have had alone."""

import asyncio

import numpy as np
import torch

from helpers.models import cell, config
from ivg.models import load
from ivg.protocol import Open, Sample, Sampling, Step
from ivg.stream import Stream
from ivg.values import lm_forward
from ivg.stream import extend_together
from pipeline.servers import ModelServer

PROMPTS_A = ["the movie was", "I loved this film so much that I"]
PROMPTS_B = ["a", "Plot: two friends, one dog", "what"]


def streams(prompts_a=PROMPTS_A, prompts_b=PROMPTS_B):
    loaded = load(config([cell("none", "none")]).models.base)
    tok = loaded.tokenizer
    out = []
    for prompts in (prompts_a, prompts_b):
        s = Stream(lm_forward(loaded.model), tok.pad_token_id, loaded.device, list(range(len(prompts))))
        s.extend([tok(p).input_ids for p in prompts])
        out.append(s)
    return out


def test_merged_forward_equals_separate_forwards_and_keeps_each_sessions_cache():
    alone, merged = streams(), streams()
    steps = [([[5], [6]], [[7], [8, 9], [10]]), ([[11], []], [[12], [13], [14, 15, 16]])]
    for new_a, new_b in steps:
        alone[0].extend(new_a)
        alone[1].extend(new_b)
        extend_together(merged, [new_a, new_b])
        for a, m in zip(alone, merged):  # float64: equal up to the order of additions
            assert torch.allclose(a.last, m.last, atol=1e-12, rtol=0)
    for a, m in zip(alone, merged):  # fork / reorder still works on the split caches
        a.select([1, 1, 0][:len(a)])
        m.select([1, 1, 0][:len(m)])
    extend_together(merged, [[[3]] * len(merged[0]), [[4]] * len(merged[1])])
    for a, m in zip(alone, merged):
        a.extend([[3] if a is alone[0] else [4]] * len(a))
        assert torch.allclose(a.last, m.last, atol=1e-12, rtol=0)
        assert a.ids == m.ids and a.tokens == m.tokens
        # a block wider than the session's own (another session fed more tokens) leaves masked holes:
        # the columns may differ, the valid ones hold the same keys and values
        for row in range(len(a)):
            assert m.mask[row].sum() == a.mask[row].sum() == len(a.cols[row]) == len(m.cols[row])
            assert m.mask[row, m.cols[row]].all()
            for (ka, va, _), (km, vm, _) in zip(a.cache, m.cache):
                assert torch.allclose(ka[row][:, a.cols[row]], km[row][:, m.cols[row]], atol=1e-12, rtol=0)
                assert torch.allclose(va[row][:, a.cols[row]], vm[row][:, m.cols[row]], atol=1e-12, rtol=0)


def step_messages(sid: str, tokens: list[int], step: int) -> dict:
    """One token step of a search: a Step to the implicit role, a Sample (guided by it) to the base."""
    tokens = np.array(tokens, dtype=np.int64)
    uniforms = np.random.default_rng(step).random(len(tokens))
    return {"base": Sample(sid, tokens, uniforms, value_from="implicit"), "implicit": Step(sid, tokens)}


def test_server_merges_concurrent_next_calls_of_two_searches():
    cfg = config([cell("implicit", "none")])

    async def two_searches(window_ms, idle_third=False):
        server = ModelServer(cfg, ["base", "implicit"], batch_window_ms=window_ms)
        sessions = {"A": PROMPTS_A, "B": PROMPTS_B} | ({"C": ["idle"]} if idle_third else {})
        for sid, prompts in sessions.items():
            sampling = Sampling(1.0, cfg.decode)
            await server.call({r: Open(sid, tuple(prompts), tuple(range(len(prompts))), sampling) for r in ("base", "implicit")})
        outs = []
        for step in range(3):
            calls = [server.call(step_messages(sid, [20 + step] * len(sessions[sid]), step)) for sid in ("A", "B")]
            outs.append(await asyncio.gather(*calls))
        return server.stats(), outs

    batched_stats, batched = asyncio.run(two_searches(window_ms=50))
    alone_stats, alone = asyncio.run(two_searches(window_ms=0))
    # one forward per role and step serves both searches (2 roles x 3 steps)
    assert batched_stats["sessions_per_forward"] == {2: 6} and batched_stats["forwards"] == 6
    assert alone_stats["sessions_per_forward"] == {1: 12}
    for step_b, step_a in zip(batched, alone):
        for out_b, out_a in zip(step_b, step_a):
            assert (out_b["base"].tokens == out_a["base"].tokens).all()
            assert torch.allclose(torch.from_numpy(out_b["base"].value), torch.from_numpy(out_a["base"].value),
                                  atol=1e-12, rtol=0)

    # a session that sends nothing does not block the others: the window times out and they run
    idle_stats, _ = asyncio.run(two_searches(window_ms=5, idle_third=True))
    assert idle_stats["sessions_per_forward"] == {2: 6}
