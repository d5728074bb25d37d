"""The oracle's own sampling pieces against the engine's (HF's warpers, ivg.sampling): two independent
implementations of one rule, compared where they are easiest to get subtly wrong (ties, thresholds)."""

import random

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from ivg.config import DecodeConfig
from ivg.reference import draw, top_k, top_p, uniform_stream
from ivg.sampling import prompt_generator, sample


def tied_logits(rng: random.Random, V: int) -> torch.Tensor:
    """Logits from a few values, so equal logits (and exact probability sums) are common."""
    return torch.tensor([rng.choice([-1.0, 0.0, 0.5, 1.0, 1.5, 3.0, rng.gauss(0, 2)]) for _ in range(V)],
                        dtype=torch.float64)


def test_warpers_match_hf_on_ties_and_thresholds():
    rng = random.Random(0)
    for _ in range(500):
        V = rng.choice([3, 4, 8, 20, 97])
        z, k = tied_logits(rng, V), rng.randint(1, V)
        p = rng.choice([0.1, 0.25, 0.5, 0.75, 0.9, 1 / 3, 2 / 3])
        hf_k = TopKLogitsWarper(k)(None, z[None])[0]
        assert torch.equal(top_k(z, k), hf_k), (z, k)  # every logit tied with the k-th stays
        assert torch.equal(top_p(hf_k, p), TopPLogitsWarper(p)(None, hf_k[None])[0]), (z, k, p)


def test_uniform_stream_is_the_engines_rule():
    for seed, pid in [(0, "p0"), (7, "a long id with spaces"), (123, "ü")]:
        ours, engine = uniform_stream(seed, pid), prompt_generator(seed, pid)
        for n in (4, 1, 3):
            assert torch.equal(torch.rand(n, generator=ours, dtype=torch.float64),
                               torch.rand(n, generator=engine, dtype=torch.float64))


def test_draw_matches_the_engines_sampler():
    rng = random.Random(1)
    for decode in (DecodeConfig(temperature=0.7), DecodeConfig(temperature=1.0, top_k=5),
                   DecodeConfig(temperature=0.8, top_k=12, top_p=0.9), DecodeConfig(temperature=0.0),
                   DecodeConfig(temperature=1.3, top_p=0.5)):
        z = torch.stack([tied_logits(rng, 40) for _ in range(64)])
        u = torch.rand(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        assert sample(z, u, decode).tolist() == [draw(z[i], u[i].item(), decode) for i in range(64)], decode
