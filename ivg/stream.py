"""A Stream is one model's incremental state over a batch of rows: KV cache, mask, token ids.

Every model (base, tuned, untuned, explicit) keeps one Stream per search session. Rows grow by
ragged blocks of new tokens, left-padded, so each row's newest token sits in the block's last column.
Padding becomes *holes* in the attention mask; position ids count only real tokens, so a row's
outputs equal those of the same tokens fed alone without padding (checked by the tests).

A row can also drop its newest tokens (a re-tokenized text changed its tail): they are masked out,
which is the per-row `crop` the cache API does not have.
"""

import time
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F

from ivg.cache import concat_caches, new_cache, select_rows, slice_cache

# forward(input_ids, attention_mask, position_ids, cache, keep_all) -> outputs (B, T or 1, D)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object, bool], torch.Tensor]


class Stream:
    def __init__(self, forward: Forward, pad_id: int, device: torch.device, owners: list):
        self.forward, self.pad_id, self.device = forward, pad_id, device
        self.cache = new_cache()
        self.mask = torch.zeros(len(owners), 0, dtype=torch.long, device=device)  # (B, T_cache)
        self.ids: list[list[int]] = [[] for _ in owners]  # valid tokens per row
        self.cols: list[list[int]] = [[] for _ in owners]  # their cache columns
        self.owners = list(owners)  # who pays for each row's tokens (a prompt key)
        self.tokens = Counter()  # tokens processed per owner
        self.last: torch.Tensor | None = None  # (B, D) output at each row's newest token

    def __len__(self) -> int:
        return len(self.owners)

    @torch.no_grad()
    def extend(self, new: list[list[int]], keep_all: bool = False) -> torch.Tensor | None:
        """Append new[i] to row i; return all block outputs (B, T, D) if keep_all, else None.

        Rows with no new tokens keep their previous `last`."""
        assert len(new) == len(self), f"{len(new)} rows of tokens for a stream of {len(self)} rows"
        lengths = [len(n) for n in new]
        T = max(lengths, default=0)
        if T == 0:
            return None
        # built as Python lists, one tensor each: a slice assignment per row costs more than a
        # small model's forward once there are hundreds of rows
        block = torch.tensor([[self.pad_id] * (T - len(n)) + list(n) for n in new], dtype=torch.long)
        block_mask = torch.tensor([[0] * (T - len(n)) + [1] * len(n) for n in new], dtype=torch.long)
        start = self.mask.shape[1]
        self.mask = torch.cat([self.mask, block_mask.to(self.device)], dim=1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        out = self.forward(block.to(self.device), self.mask, positions, self.cache, keep_all)
        for i, n in enumerate(new):
            if n:
                self.ids[i] = self.ids[i] + list(n)
                self.cols[i] = self.cols[i] + list(range(start + T - len(n), start + T))
                self.tokens[self.owners[i]] += len(n)
        has_new = torch.tensor([n > 0 for n in lengths], device=self.device)[:, None]
        newest = out[:, -1]
        self.last = newest if self.last is None else torch.where(has_new, newest, self.last)
        return out if keep_all else None

    def sync(self, target: list[list[int]], keep_all: bool = False):
        """Make row i hold exactly target[i] (a re-tokenized text): keep the common prefix, mask
        out the rest, feed the new suffix. Where the tail changed, the last kept token is fed
        again, so the block's outputs predict every new token (the old `last` no longer does).

        Returns (block outputs or None, suffix fed per row, tokens re-fed per row: 0 or 1)."""
        suffixes, refed = [], []
        for i, want in enumerate(target):
            have = self.ids[i]
            c = 0
            while c < min(len(have), len(want)) and have[c] == want[c]:
                c += 1
            back = int(c < len(have))
            if back:
                c -= 1
                self.mask[i, self.cols[i][c:]] = 0
                self.ids[i], self.cols[i] = have[:c], self.cols[i][:c]
            suffixes.append(list(want[c:]))
            refed.append(back)
        return self.extend(suffixes, keep_all), suffixes, refed

    def select(self, rows: list[int]) -> None:
        """Fork, reorder or drop rows: the new row j is the old row rows[j]."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        select_rows(self.cache, index)
        self.mask = self.mask[index]
        self.ids = [self.ids[r] for r in rows]
        self.cols = [self.cols[r] for r in rows]
        self.owners = [self.owners[r] for r in rows]
        if self.last is not None:
            self.last = self.last[index]


@torch.no_grad()
def extend_together(streams: list[Stream], news: list[list[list[int]]]) -> float:
    """streams[k].extend(news[k]) for all k in one forward; returns the seconds spent merging and
    splitting (the cost of batching), not forwarding."""
    if len(streams) == 1:
        streams[0].extend(news[0])
        return 0.0
    t0 = time.perf_counter()
    lengths = [s.mask.shape[1] for s in streams]
    pads = [max(lengths) - n for n in lengths]  # left padding that aligns every session's columns
    merged = Stream(streams[0].forward, streams[0].pad_id, streams[0].device,
                    [(k, o) for k, s in enumerate(streams) for o in s.owners])
    merged.cache = concat_caches([s.cache for s in streams], pads)
    merged.mask = torch.cat([F.pad(s.mask, (p, 0)) for s, p in zip(streams, pads)])  # (sum B, T_max)
    merged.ids = [ids for s in streams for ids in s.ids]
    merged.cols = [[c + p for c in cols] for s, p in zip(streams, pads) for cols in s.cols]
    merged.last = torch.cat([s.last for s in streams])  # (sum B, D)
    t1 = time.perf_counter()
    merged.extend([rows for new in news for rows in new])
    t2 = time.perf_counter()
    start = 0
    for k, (s, p) in enumerate(zip(streams, pads)):
        rows = slice(start, start + len(s))
        start += len(s)
        s.cache = slice_cache(merged.cache, rows, p)
        s.mask = merged.mask[rows, p:]
        s.ids = merged.ids[rows]
        s.cols = [[c - p for c in cols] for cols in merged.cols[rows]]
        s.last = merged.last[rows]
    for (k, owner), n in merged.tokens.items():
        streams[k].tokens[owner] += n
    return (t1 - t0) + (time.perf_counter() - t2)
