"""The one place that touches the transformers cache API, which moves between versions.

Rows of a batch are forked (a beam's children), reordered and dropped (finished beams) at chunk
boundaries; `select_rows` does all three with one index, in place.
"""

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep rows `rows` (may repeat, reorder or drop rows): index_select on the batch dim."""
    cache.reorder_cache(rows)


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()
