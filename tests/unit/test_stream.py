"""Streams: padded, forked and re-tokenized rows give the outputs of the same tokens fed alone."""

import torch

from ivg.models import load
from ivg.stream import Stream
from ivg.values import lm_forward

from helpers.models import tiny


def stream_of(loaded, rows):
    return Stream(lm_forward(loaded.model), 0, loaded.device, list(range(rows)))


def alone(loaded, ids):
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids])).logits[0, -1]


def test_ragged_blocks_equal_unpadded_rows():
    m = load(tiny("tiny:base"))
    s = stream_of(m, 3)
    seqs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    s.extend(seqs)
    more = [[20, 21], [], [22]]
    s.extend(more)
    for i, (a, b) in enumerate(zip(seqs, more)):
        assert torch.allclose(s.last[i], alone(m, a + b), atol=1e-10)
    assert s.ids == [a + b for a, b in zip(seqs, more)] and s.tokens == {0: 5, 1: 1, 2: 6}


def test_fork_and_drop_rows():
    m = load(tiny("tiny:base"))
    s = stream_of(m, 2)
    s.extend([[5, 6], [7, 8, 9]])
    s.select([1, 1, 0])  # fork row 1 twice, move row 0 last
    s.extend([[30], [31], [32]])
    expected = [[7, 8, 9, 30], [7, 8, 9, 31], [5, 6, 32]]
    for i, ids in enumerate(expected):
        assert torch.allclose(s.last[i], alone(m, ids), atol=1e-10)


def test_sync_replaces_a_changed_tail():
    m = load(tiny("tiny:base"))
    s = stream_of(m, 2)
    s.extend([[5, 6, 7, 8], [5, 6]])
    _, suffix, refed = s.sync([[5, 6, 9, 10, 11], [5, 6, 12]])
    assert suffix == [[6, 9, 10, 11], [12]] and refed == [1, 0]  # row 0 re-feeds its last kept token
    assert s.ids == [[5, 6, 9, 10, 11], [5, 6, 12]]
    for i, ids in enumerate(s.ids):
        assert torch.allclose(s.last[i], alone(m, ids), atol=1e-10)
