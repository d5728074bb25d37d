"""Model servers: the engine's roles (ivg/values.py) behind Ray actors, with dynamic batching.

A server holds one role (placement `separate`) or all of them (`colocated`) and serves the role
protocol to many search actors at once. Every search has its own session: its own Streams, with
their own KV caches. Per token step each search sends `next` for its session; within
`batch_window_ms` the server gathers the `next` calls of all searches (closing the window early
once every open session of the role is waiting) and runs ONE forward per model for all of them:

  merge   the sessions' caches are concatenated along the batch dim, the shorter ones left-padded
          with masked columns (Stream's holes: masked, not counted in positions), so each row
          attends to exactly the tokens it attended to alone;
  forward one Stream.extend over the merged rows;
  split   each session takes its rows back and drops its left padding: its cache again holds only
          its own tokens (plus masked holes where the merged block was wider than its own), so
          merging never leaks into later steps.

Outputs equal the unmerged ones up to float summation order (the same property that makes a
prompt's output independent of its batch). The price is one extra copy of the sessions' caches
per step (DynamicCache already copies them once per step in torch.cat), measured in `stats()`.
Other calls (open, select, chunk, check, close) run as they arrive: they are per chunk, not per token.
"""

import asyncio
import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ivg.config import GenerationConfig
from ivg.engine import eos_ids
from ivg.models import load, load_tokenizer
from ivg.stream import Stream
from ivg.values import BaseRole, ExplicitRole, ImplicitRole


def needed_roles(config: GenerationConfig) -> list[str]:
    """base, plus every value function some method uses, token-wise or chunk-level."""
    used = {g for m in config.methods for g in (m.token, m.chunk)} - {"none"}
    return ["base"] + sorted(used)


def build_role(name: str, config: GenerationConfig, base_tokenizer):
    models = config.models
    if name == "base":
        return BaseRole([load(models.base)], base_tokenizer)
    if name == "implicit":
        return ImplicitRole(load(models.tuned), load(models.untuned), base_tokenizer)
    return ExplicitRole(load(models.explicit), base_tokenizer)


# ---------------------------------------------------------------- merged forward

@torch.inference_mode()
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


# ---------------------------------------------------------------- the server

class ModelServer:
    """Serves `roles` to many searches. A plain class, so tests can drive it without Ray; the
    pipeline runs it as an async Ray actor (`ray.remote(ModelServer)`): one event loop, so calls
    never run concurrently, and `next` calls wait on a future until their batch has run."""

    def __init__(self, config: GenerationConfig, roles: list[str], batch_window_ms: float = 0.0,
                 torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.base_tokenizer = load_tokenizer(config.models.base)
        self.roles = {name: build_role(name, config, self.base_tokenizer) for name in roles}
        self.window = batch_window_ms / 1000
        self.queue: list[tuple[dict, asyncio.Future]] = []  # [({role: (sid, new)}, future)]
        self.flusher: asyncio.Task | None = None
        self.counts = Counter()  # next requests, forwards, merge seconds, ...
        self.sessions_per_forward = Counter()  # {sessions merged into one forward: times}

    def info(self) -> dict:
        base = self.roles.get("base")
        if base is None:
            return {"roles": sorted(self.roles)}
        loaded = base.models[0]
        return {"roles": sorted(self.roles),
                "eos": sorted(eos_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None)))}

    def stats(self) -> dict:
        return {**self.counts, "sessions_per_forward": dict(self.sessions_per_forward)}

    async def call(self, calls: dict) -> dict:
        """{role: (method, args)} -> {role: result}; `next` calls are batched across callers."""
        out, batched = {}, {}
        for role, (method, args) in calls.items():
            if method == "next" and self.window > 0:
                if args[0] not in self.roles[role].sessions:  # fail this caller alone, not its batch
                    raise KeyError(f"{role}: no session {args[0]!r} here (was this server restarted?)")
                batched[role] = args
            else:
                out[role] = self.run(role, method, args)
        if batched:
            out.update(await self.enqueue(batched))
        return out

    def run(self, role: str, method: str, args: tuple):
        result = getattr(self.roles[role], method)(*args)
        if method == "next":
            self.counts["next_requests"] += 1
            self.counts["forwards"] += 1
            self.sessions_per_forward[1] += 1
        return result.cpu() if isinstance(result, torch.Tensor) else result

    def drop(self, sids: list[str]) -> None:
        """Forget sessions of a search that failed midway (its caches would otherwise leak)."""
        for role in self.roles.values():
            for sid in sids:
                role.sessions.pop(sid, None)

    # ------------------------------------------------------------ dynamic batching of `next`

    async def enqueue(self, request: dict) -> dict:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        if self.everyone_waiting():
            self.flush()
        elif self.flusher is None:
            self.flusher = asyncio.ensure_future(self.flush_after_window())
        return await future

    def everyone_waiting(self) -> bool:
        """No other session of these roles can join this batch: no point waiting out the window."""
        waiting = defaultdict(set)
        for request, _ in self.queue:
            for role, (sid, _) in request.items():
                waiting[role].add(sid)
        return all(waiting[role] >= set(self.roles[role].sessions) for role in waiting)

    async def flush_after_window(self) -> None:
        await asyncio.sleep(self.window)
        self.flusher = None
        self.flush()

    def flush(self) -> None:
        """Run every queued `next` call: one merged forward per role and model."""
        queue, self.queue = self.queue, []
        if self.flusher is not None:
            self.flusher.cancel()
            self.flusher = None
        if not queue:
            return
        try:
            results = self.next_merged([request for request, _ in queue])
        except Exception as e:  # a failed batch fails every caller in it, like serve.batch
            for _, future in queue:
                future.set_exception(e)
            return
        assert len(results) == len(queue), f"{len(results)} results for {len(queue)} requests"
        for (_, future), result in zip(queue, results):
            future.set_result(result)

    def next_merged(self, requests: list[dict]) -> list[dict]:
        by_role = defaultdict(list)  # role -> [(request index, sid, new)]
        for i, request in enumerate(requests):
            for role, (sid, new) in request.items():
                by_role[role].append((i, sid, new))
        results = [{} for _ in requests]
        for name, items in by_role.items():
            role = self.roles[name]
            sessions = [role.sessions[sid] for _, sid, _ in items]
            for j in range(len(role.models)):  # one forward per model (tuned, untuned: two)
                self.counts["merge_s"] += extend_together([s.streams[j] for s in sessions],
                                                          [new for _, _, new in items])
            self.counts["next_requests"] += len(items)
            self.counts["forwards"] += 1
            self.sessions_per_forward[len(items)] += 1
            for i, sid, new in items:  # fed already: the role only turns `last` into its vector
                results[i][name] = role.next(sid, [[] for _ in new]).cpu()
        return results
