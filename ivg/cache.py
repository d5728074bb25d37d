"""The KV cache, and the one place that touches the transformers cache API (it moves between versions).

`InPlaceCache` is a transformers `Cache` whose layers (`InPlaceLayer`, a `DynamicLayer`) keep keys and
values in preallocated (B, H, capacity, D) tensors: an append writes the next columns, and capacity
doubles when it runs out, so a token costs its own columns, not a copy of the cache. (DynamicLayer
re-concatenates the whole cache on every append; StaticCache preallocates, but attends over its full
`max_cache_len` at every step and needs that length up front; neither forks rows.)

Rows are forked (a beam's children), reordered and dropped (finished beams) at chunk boundaries by
`select`: one index_select on the batch dim, of the columns in use only. Sessions of several searches
are merged for one forward by `merge` and split again by `rows`, which returns views: a split copies
nothing, and merging the same sessions again at the next step (they still lie side by side in the
merged storage) copies nothing either. Only a change of the group (a select, a session stepping
alone) costs one copy.
"""

import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 16  # columns: the first allocation's floor, so short prompts do not regrow at once


class InPlaceLayer(DynamicLayer):
    """One layer's keys and values: `store_*` (B, H, capacity, D), of which the first `length` columns
    are in use; `keys` / `values` are views of those columns (what attention reads)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # storage this layer allocated (its store is a prefix of its rows) and the one it used before:
        # `select` gathers into the spare and keeps the old one, so that forking every chunk does not
        # allocate (on CPU, first touching fresh pages costs more than the gather itself)
        self.own: tuple[torch.Tensor, torch.Tensor] | None = None
        self.spare: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.store_k = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.store_v = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.length = 0
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self.store_k[:, :, :self.length]  # (B, H, T, D)
        self.values = self.store_v[:, :, :self.length]

    @property
    def capacity(self) -> int:
        return self.store_k.shape[2]

    def reserve(self, capacity: int) -> None:
        """Move to new storage of `capacity` columns. Columns past `length` are written before they are
        read, so they start uninitialised."""
        k = self.store_k.new_empty((*self.store_k.shape[:2], capacity, self.store_k.shape[-1]))
        v = self.store_v.new_empty((*self.store_v.shape[:2], capacity, self.store_v.shape[-1]))
        k[:, :, :self.length] = self.keys
        v[:, :, :self.length] = self.values
        self.store_k, self.store_v = k, v
        self.own, self.spare = (k, v), None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.length + key_states.shape[-2]
        if n > self.capacity:
            self.reserve(max(n, 2 * self.capacity, MIN_CAPACITY))
        self.store_k[:, :, self.length:n] = key_states
        self.store_v[:, :, self.length:n] = value_states
        self.length = n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def select(self, index: torch.Tensor) -> None:
        """Row j becomes old row index[j]: one gather of the columns in use, into the spare storage
        (or fresh storage if it is too small)."""
        n, shape_k, shape_v = len(index), self.store_k.shape[1:], self.store_v.shape[1:]
        spare = self.spare
        if spare is None or spare[0].shape[0] < n or spare[0].shape[1:] != shape_k or spare[1].shape[1:] != shape_v:
            spare = (self.store_k.new_empty((n, *shape_k)), self.store_v.new_empty((n, *shape_v)))
        k, v = spare[0][:n], spare[1][:n]
        torch.index_select(self.keys, 0, index, out=k[:, :, :self.length])
        torch.index_select(self.values, 0, index, out=v[:, :, :self.length])
        self.spare = self.own  # storage a view of someone else's (a merged batch) is never reused
        self.own, self.store_k, self.store_v = spare, k, v
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.select(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("rows are cut per row by masking (ivg.stream.Stream.sync), not cropped")


class InPlaceCache(Cache):
    def __init__(self, layers: list[InPlaceLayer] | None = None):
        if layers is None:
            super().__init__(layer_class_to_replicate=InPlaceLayer)
        else:
            super().__init__(layers=layers)

    def __iter__(self):  # as DynamicCache: (keys, values, sliding window) per layer
        for layer in self.layers:
            yield layer.keys, layer.values, None

    def select(self, index: torch.Tensor) -> None:
        """Fork, reorder or drop rows, in place: the new row j is the old row index[j]."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.select(index)

    def rows(self, rows: slice, pad: int) -> "InPlaceCache":
        """Rows `rows` without their first `pad` (padding) columns: views, nothing copied."""
        out = []
        for layer in self.layers:
            part = InPlaceLayer()
            part.device, part.is_initialized, part.length = layer.device, True, layer.length - pad
            part.store_k, part.store_v = layer.store_k[rows, :, pad:], layer.store_v[rows, :, pad:]
            part._views()
            out.append(part)
        return InPlaceCache(out)


def merge(caches: list[InPlaceCache], pads: list[int]) -> InPlaceCache:
    """One cache holding every cache's rows, cache k left-padded by pads[k] masked columns.

    If the caches are still the side-by-side views a `rows` split left (the same sessions merged
    again, none of them selected or stepped alone since), the merged cache is a view of that storage;
    otherwise the rows are copied once into new storage (zeros in the padding: masked columns must
    hold finite numbers, or 0 * NaN in attention would poison the row)."""
    if not all(len(c.layers) == len(caches[0].layers) and all(l.is_initialized for l in c.layers) for c in caches):
        raise ValueError("merging caches needs every session prefilled, with the same layers")
    layers = []
    for per_cache in zip(*[c.layers for c in caches]):
        width = max(l.length + p for l, p in zip(per_cache, pads))
        k = _adjacent([l.store_k for l in per_cache], [l.length for l in per_cache], pads)
        if k is not None:
            v = _adjacent([l.store_v for l in per_cache], [l.length for l in per_cache], pads)
        if k is None or v is None:
            capacity = max(width + 1, max(l.capacity + p for l, p in zip(per_cache, pads)))
            first = per_cache[0].store_k
            k = first.new_zeros((sum(l.store_k.shape[0] for l in per_cache), first.shape[1], capacity, first.shape[-1]))
            v = per_cache[0].store_v.new_zeros((*k.shape[:-1], per_cache[0].store_v.shape[-1]))
            start = 0
            for l, p in zip(per_cache, pads):
                rows = slice(start, start + l.store_k.shape[0])
                start = rows.stop
                k[rows, :, p:p + l.length] = l.keys
                v[rows, :, p:p + l.length] = l.values
        merged = InPlaceLayer()
        merged.device, merged.is_initialized, merged.length = per_cache[0].device, True, width
        merged.store_k, merged.store_v = k, v
        merged._views()
        layers.append(merged)
    return InPlaceCache(layers)


def _adjacent(stores: list[torch.Tensor], lengths: list[int], pads: list[int]) -> torch.Tensor | None:
    """The view of one storage covering `stores` if they lie in it row after row, each shifted right by
    its pad (so the merged columns line up), else None."""
    base = stores[0]._base
    if base is None or base.dim() != 4 or any(s._base is not base or s.stride() != base.stride() for s in stores):
        return None
    row_stride, col_stride = base.stride(0), base.stride(2)
    first = stores[0].storage_offset() - base.storage_offset()
    row0, col0 = divmod(first, row_stride)
    col0 -= pads[0] * col_stride  # the merged view starts pads[0] columns left of the first store
    if col0 < 0 or col0 % col_stride:
        return None
    row = row0
    for s, p in zip(stores, pads):
        if s.storage_offset() - base.storage_offset() != row * row_stride + col0 + p * col_stride:
            return None
        row += s.shape[0]
    col = col0 // col_stride
    return base[row0:row, :, col:]


@functools.cache
def _cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(module: torch.nn.Module, cache: Cache) -> dict:
    """The keyword that passes `cache` to this module's forward: `cache` in transformers >= 5.24
    (`past_key_values=` warns there, and goes in 5.40), `past_key_values` before."""
    return {_cache_keyword(type(module).forward): cache}
