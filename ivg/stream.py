"""A Stream is one model's incremental state over a batch of rows: KV cache, mask, token ids.

Every model (base, tuned, untuned, explicit) keeps one Stream per search session. Rows grow by
ragged blocks of new tokens, left-padded, so each row's newest token sits in the block's last column.
Padding becomes *holes* in the attention mask; position ids count only real tokens, so a row's
outputs equal those of the same tokens fed alone without padding (checked by the tests).

A row can also drop its newest tokens (a re-tokenized text changed its tail): they are masked out,
which is the per-row `crop` the cache API does not have.

All per-row state is tensors over the rows (cache columns, mask, token ids, valid-token counts), so a
step costs a few tensor operations whatever the number of rows; `ids` and `cols`, the per-row lists,
are derived from them on demand (re-tokenization and tests use them, the token loop does not).
"""

import time
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F

from ivg.cache import InPlaceCache, merge

# forward(input_ids, attention_mask, position_ids, cache, keep_all) -> outputs (B, T or 1, D)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object, bool], torch.Tensor]


def left_padded(new: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows as one left-padded block (B, T) and their lengths (B,); built as Python lists, one
    tensor each (a slice assignment per row costs more than a small model's forward)."""
    T = max((len(n) for n in new), default=0)
    block = torch.tensor([[pad_id] * (T - len(n)) + list(n) for n in new], dtype=torch.long).reshape(len(new), T)
    return block, torch.tensor([len(n) for n in new], dtype=torch.long)


class Stream:
    def __init__(self, forward: Forward, pad_id: int, device: torch.device, owners: list):
        self.forward, self.pad_id, self.device = forward, pad_id, device
        B = len(owners)
        self.cache = InPlaceCache()
        self.mask = torch.zeros(B, 0, dtype=torch.long, device=device)  # (B, T_cache) 1 = a valid token
        self.tok = torch.zeros(B, 0, dtype=torch.long, device=device)  # (B, T_cache) token id per column
        self.count = torch.zeros(B, dtype=torch.long, device=device)  # (B,) valid tokens per row
        self.keys = list(dict.fromkeys(owners))  # the distinct owners (who pays for a row's tokens)
        index = {k: i for i, k in enumerate(self.keys)}
        self.owner = torch.tensor([index[o] for o in owners], dtype=torch.long, device=device)  # (B,)
        self.paid = torch.zeros(len(self.keys), dtype=torch.long, device=device)  # tokens fed per owner
        self.last: torch.Tensor | None = None  # (B, D) output at each row's newest token

    def __len__(self) -> int:
        return len(self.owner)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def owners(self) -> list:
        return [self.keys[i] for i in self.owner.tolist()]

    @property
    def tokens(self) -> Counter:
        """Tokens processed per owner."""
        return Counter({k: n for k, n in zip(self.keys, self.paid.tolist()) if n})

    @property
    def ids(self) -> list[list[int]]:
        """Valid tokens per row."""
        return [t[m].tolist() for t, m in zip(self.tok.cpu(), self.mask.cpu().bool())]

    @property
    def cols(self) -> list[list[int]]:
        """Their cache columns."""
        return [m.nonzero().flatten().tolist() for m in self.mask.cpu()]

    @torch.no_grad()
    def extend(self, new: list[list[int]], keep_all: bool = False) -> torch.Tensor | None:
        """Append new[i] to row i; return all block outputs (B, T, D) if keep_all, else None.

        Rows with no new tokens keep their previous `last`."""
        assert len(new) == len(self), f"{len(new)} rows of tokens for a stream of {len(self)} rows"
        block, lengths = left_padded(new, self.pad_id)
        return self.feed(block, lengths, keep_all)

    @torch.no_grad()
    def feed(self, block: torch.Tensor, lengths: torch.Tensor, keep_all: bool = False) -> torch.Tensor | None:
        """The tensor form of `extend`: block (B, T) left-padded ids, lengths (B,) real tokens per row."""
        if block.shape[1] == 0:
            return None
        out, _ = feed_together([self], [block], [lengths], keep_all)
        return out if keep_all else None

    def step(self, tokens: torch.Tensor) -> None:
        """Feed one token per row, tokens (B,), where -1 means none for that row."""
        has = tokens >= 0
        if bool(has.any()):
            self.feed(tokens.clamp(min=0).to(torch.long)[:, None], has.to(torch.long))

    def sync(self, target: list[list[int]], keep_all: bool = False):
        """Make row i hold exactly target[i] (a re-tokenized text): keep the common prefix, mask
        out the rest, feed the new suffix. Where the tail changed, the last kept token is fed
        again, so the block's outputs predict every new token (the old `last` no longer does).

        Returns (block outputs or None, suffix fed per row, tokens re-fed per row: 0 or 1)."""
        suffixes, refed = [], []
        ids, cols = self.ids, self.cols
        for i, want in enumerate(target):
            have = ids[i]
            c = 0
            while c < min(len(have), len(want)) and have[c] == want[c]:
                c += 1
            back = int(c < len(have))
            if back:
                c -= 1
                self.mask[i, cols[i][c:]] = 0
                self.count[i] = c
            suffixes.append(list(want[c:]))
            refed.append(back)
        return self.extend(suffixes, keep_all), suffixes, refed

    def select(self, rows: list[int] | torch.Tensor) -> None:
        """Fork, reorder or drop rows: the new row j is the old row rows[j]."""
        index = torch.as_tensor(rows, dtype=torch.long).to(self.device)
        self.cache.select(index)
        self.mask, self.tok, self.count, self.owner = (x[index] for x in (self.mask, self.tok, self.count, self.owner))
        if self.last is not None:
            self.last = self.last[index]


@torch.no_grad()
def feed_together(streams: list[Stream], blocks: list[torch.Tensor], lengths: list[torch.Tensor],
                  keep_all: bool = False) -> tuple[torch.Tensor, float]:
    """streams[k] fed blocks[k] (B_k, T_k) with lengths[k], all in one forward; returns its outputs
    (sum B, T, D), rows in stream order, and the seconds spent outside the forward.

    Streams of different widths are aligned by left-padding the narrower ones with masked columns;
    their caches are merged (ivg.cache.merge: a view when they lie side by side already) and each
    stream keeps a view of its rows afterwards, so a merged step copies a cache at most once."""
    t0 = time.perf_counter()
    T = max(b.shape[1] for b in blocks)
    block = torch.cat([F.pad(b, (T - b.shape[1], 0), value=s.pad_id) for s, b in zip(streams, blocks)]).to(streams[0].device)
    lengths_all = torch.cat(lengths).to(streams[0].device)
    widths = [s.width for s in streams]
    pads = [max(widths) - w for w in widths]
    if len(streams) == 1:
        cache, mask, count = streams[0].cache, streams[0].mask, streams[0].count
    else:
        cache = merge([s.cache for s in streams], pads)
        mask = torch.cat([F.pad(s.mask, (p, 0)) for s, p in zip(streams, pads)])
        count = torch.cat([s.count for s in streams])
    block_mask = (torch.arange(T, device=block.device) >= (T - lengths_all)[:, None]).to(torch.long)  # (B, T)
    mask = torch.cat([mask, block_mask], dim=1)
    positions = (count[:, None] + block_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only
    t1 = time.perf_counter()
    out = streams[0].forward(block, mask, positions, cache, keep_all)
    t2 = time.perf_counter()
    newest, has_new = out[:, -1], (lengths_all > 0)[:, None]
    all_new = bool(has_new.all())
    start = 0
    for s, b, n, p in zip(streams, blocks, lengths, pads):
        rows = slice(start, start + len(s))
        start = rows.stop
        if len(streams) > 1:
            s.cache = cache.rows(rows, p)
        s.mask = mask[rows, p:]
        s.tok = torch.cat([s.tok, block[rows]], dim=1)
        n = n.to(s.device)
        s.count = s.count + n
        s.paid.index_add_(0, s.owner, n)
        fresh = newest[rows]
        if s.last is not None and not all_new:  # a row without a new token keeps its output (B, D)
            fresh = torch.where(has_new[rows], fresh, s.last)
        s.last = fresh
    return out, (t1 - t0) + (time.perf_counter() - t2)


def extend_together(streams: list[Stream], news: list[list[list[int]]]) -> float:
    """streams[k].extend(news[k]) for all k in one forward; returns the seconds spent outside the
    forward (merging caches and masks, splitting: the cost of batching)."""
    blocks, lengths = zip(*[left_padded(new, s.pad_id) for s, new in zip(streams, news)])
    if max(b.shape[1] for b in blocks) == 0:
        return 0.0
    _, overhead = feed_together(streams, list(blocks), list(lengths))
    return overhead
