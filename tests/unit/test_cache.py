"""ivg.cache.InPlaceCache: appends write in place, and append / fork / reorder / drop / merge / split
give exactly the keys and values of a recompute from scratch."""

import torch

from helpers.models import tiny
from ivg.cache import InPlaceCache, cache_kwargs, merge
from ivg.models import load
from ivg.stream import Stream, feed_together, left_padded
from ivg.values import lm_forward


def model():
    return load(tiny("tiny:base"))


def recompute(m, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) (H, T, D) of `ids` fed alone, in one forward, no padding."""
    cache = InPlaceCache()
    with torch.no_grad():
        m.model(torch.tensor([ids]), use_cache=True, **cache_kwargs(m.model, cache))
    return [(k[0], v[0]) for k, v, _ in cache]


def assert_rows_equal(m, stream: Stream, expected: list[list[int]]):
    """Every row's valid cache columns hold the keys and values of its tokens fed alone."""
    assert stream.ids == expected
    for row, (ids, cols) in enumerate(zip(expected, stream.cols)):
        for (k, v, _), (k0, v0) in zip(stream.cache, recompute(m, ids)):
            assert torch.allclose(k[row][:, cols], k0, atol=1e-12, rtol=0)
            assert torch.allclose(v[row][:, cols], v0, atol=1e-12, rtol=0)


def test_append_writes_in_place_until_capacity_then_grows_geometrically():
    m = model()
    s = Stream(lm_forward(m.model), 0, m.device, [0, 1])
    s.extend([[5, 6, 7], [8]])
    layer = s.cache.layers[0]
    storage, capacity = layer.store_k.data_ptr(), layer.capacity
    for t in range(capacity - s.width):  # fill the capacity: the same storage throughout
        s.extend([[10 + t], [20 + t]])
        assert layer.store_k.data_ptr() == storage
    s.extend([[1], [2]])  # one past it: new storage, at least twice as large
    assert layer.store_k.data_ptr() != storage and layer.capacity >= 2 * capacity
    assert_rows_equal(m, s, [[5, 6, 7] + [10 + t for t in range(capacity - 3)] + [1],
                             [8] + [20 + t for t in range(capacity - 3)] + [2]])


def test_fork_reorder_drop_equal_a_recompute():
    m = model()
    s = Stream(lm_forward(m.model), 0, m.device, [0, 1, 2])
    s.extend([[5, 6], [7, 8, 9], [3]])
    s.select([1, 1, 0, 1])  # fork row 1 three times, move row 0, drop row 2
    s.extend([[30], [31, 32], [], [33]])
    s.select([3, 0])  # reorder and drop again (into the spare storage this time)
    s.extend([[40], [41]])
    assert_rows_equal(m, s, [[7, 8, 9, 33, 40], [7, 8, 9, 30, 41]])
    assert s.tokens == {0: 2, 1: 3 + 4 + 2, 2: 1}


def test_merge_and_split_copy_once_then_never_while_the_group_stays():
    m = model()
    a, b = (Stream(lm_forward(m.model), 0, m.device, list(range(n))) for n in (2, 3))
    a.extend([[5, 6], [7]])
    b.extend([[1, 2, 3, 4], [5], [6, 7]])

    def step(tokens_a, tokens_b):
        feed_together([a, b], *zip(left_padded(tokens_a, 0), left_padded(tokens_b, 0)))

    step([[10], [11]], [[12], [13], [14]])  # the first merge copies both caches into one storage
    layer_a, layer_b = a.cache.layers[0], b.cache.layers[0]
    assert layer_a.store_k._base is layer_b.store_k._base  # both are views of the merged storage
    storage = layer_a.store_k._base.data_ptr()
    step([[20], [21]], [[22], [23], [24]])  # the same group again: merged as a view, nothing copied
    assert a.cache.layers[0].store_k._base.data_ptr() == storage == b.cache.layers[0].store_k._base.data_ptr()
    assert_rows_equal(m, a, [[5, 6, 10, 20], [7, 11, 21]])
    assert_rows_equal(m, b, [[1, 2, 3, 4, 12, 22], [5, 13, 23], [6, 7, 14, 24]])
    b.select([2, 0])  # a fork leaves the group (its own storage); the next merge copies again
    step([[30], [31]], [[32], [33]])
    assert_rows_equal(m, a, [[5, 6, 10, 20, 30], [7, 11, 21, 31]])
    assert_rows_equal(m, b, [[6, 7, 14, 24, 32], [1, 2, 3, 4, 12, 22, 33]])


def test_merge_pads_with_zeros_and_checks_its_inputs():
    m = model()
    a, b = (Stream(lm_forward(m.model), 0, m.device, [0]) for _ in range(2))
    a.extend([[5, 6, 7]])
    b.extend([[8]])
    merged = merge([a.cache, b.cache], [0, 2])
    keys = merged.layers[0].keys
    assert keys.shape[0] == 2 and keys.shape[2] == 3 and (keys[1, :, :2] == 0).all()
    assert torch.equal(keys[1, :, 2], b.cache.layers[0].keys[0, :, 0])
