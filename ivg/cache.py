"""The one place that touches the transformers cache API, which moves between versions.

Rows of a batch are forked (a beam's children), reordered and dropped (finished beams) at chunk
boundaries; `select_rows` does all three with one index, in place.
"""

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def cache_kwarg(model) -> str:
    """The name `forward` takes the cache by: `cache` since transformers 5.2x (where `past_key_values`
    still works but warns on every call), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache() -> DynamicCache:
    return DynamicCache()


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep rows `rows` (may repeat, reorder or drop rows): index_select on the batch dim."""
    cache.reorder_cache(rows)


def concat_caches(caches: list[DynamicCache], pads: list[int]) -> DynamicCache:
    """One cache holding every cache's rows; cache k left-padded by pads[k] zero columns."""
    layers = zip(*[list(c) for c in caches])  # per layer: [(keys, values, sliding) per cache]
    data = []
    for per_cache in layers:
        if any(sliding is not None for _, _, sliding in per_cache):
            raise NotImplementedError("merging sliding-window caches; set batch_window_ms: 0")
        keys = torch.cat([F.pad(k, (0, 0, p, 0)) for (k, _, _), p in zip(per_cache, pads)])  # (B, H, T, D)
        values = torch.cat([F.pad(v, (0, 0, p, 0)) for (_, v, _), p in zip(per_cache, pads)])
        data.append((keys, values))
    return DynamicCache(data)


def slice_cache(cache: DynamicCache, rows: slice, pad: int) -> DynamicCache:
    """Rows `rows` of a merged cache, without their first `pad` (padding) columns."""
    return DynamicCache([(k[rows, :, pad:], v[rows, :, pad:]) for k, v, _ in cache])
