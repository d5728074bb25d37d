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

Faults: sessions live in the server's memory, so a server that Ray restarted has none. A call for a
session it does not hold raises `SessionLost`, which the search actor treats as a lost process: the
shard runs again from the start. A search actor runs one search at a time, so when a client (search
actor) opens a session, any other session it still holds here was left by a search that died (or
by its previous life, before Ray restarted it) and is dropped: dead searches never leak caches.
"""

import logging
import os
from collections import Counter, defaultdict

import torch

from ivg.config import GenerationConfig
from ivg.engine import eos_ids, load_role
from ivg.models import load_tokenizer
from ivg.stream import extend_together
from pipeline.batching import Batcher


log = logging.getLogger(__name__)


def warn_if_gpus_unseen(roles: list[str]) -> None:
    """Ray gave this server GPUs, but torch sees no CUDA device (a CPU-only torch build, a driver
    problem): its models would silently run on the CPU. Say so where the run's log shows it."""
    import ray

    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    if gpus and not torch.cuda.is_available():
        log.warning("WARNING: model server %s was given GPU(s) %s (CUDA_VISIBLE_DEVICES=%r) but torch %s sees no "
                    "CUDA device: its models run on the CPU. Install a CUDA build of torch on this node, or set "
                    "num_gpus: 0.", "/".join(roles), gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.__version__)


class SessionLost(RuntimeError):
    """This server does not hold the session (it was restarted, or the search was dropped)."""


# ---------------------------------------------------------------- the server

SESSION_METHODS = ("select", "next", "chunk", "close")  # calls on an open session

class ModelServer:
    """Serves `roles` to many searches. A plain class, so tests can drive it without Ray; the
    pipeline runs it as an async Ray actor (`ray.remote(ModelServer)`): one event loop, so calls
    never run concurrently, and `next` calls wait on a future until their batch has run."""

    def __init__(self, config: GenerationConfig, roles: list[str], batch_window_ms: float = 0.0,
                 torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        warn_if_gpus_unseen(roles)
        self.base_tokenizer = load_tokenizer(config.models.base)
        self.roles = {name: load_role(name, config, self.base_tokenizer) for name in roles}
        self.window = batch_window_ms / 1000
        # `next` requests ({role: (sid, new)}) of many searches, merged into one forward per model
        self.batcher = Batcher(self.next_merged, self.window, self.everyone_waiting)
        self.counts = Counter()  # next requests, forwards, merge seconds, ...
        self.sessions_per_forward = Counter()  # {sessions merged into one forward: times}
        self.client_of: dict[str, str] = {}  # session id -> the client (search actor) that opened it

    def info(self) -> dict:
        base = self.roles.get("base")
        if base is None:
            return {"roles": sorted(self.roles)}
        loaded = base.models[0]
        return {"roles": sorted(self.roles),
                "eos": sorted(eos_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None)))}

    def stats(self) -> dict:
        return {**self.counts, "sessions_per_forward": dict(self.sessions_per_forward),
                "open_sessions": len(self.client_of)}

    async def call(self, calls: dict, client: str | None = None) -> dict:
        """{role: (method, args)} -> {role: result}; `next` calls are batched across callers."""
        out, batched = {}, {}
        for role, (method, args) in calls.items():
            if method == "open":
                self.open_for(client, args[0])
            elif method in SESSION_METHODS and args[0] not in self.roles[role].sessions:
                # checked before anything runs or joins a batch: this caller fails alone
                raise SessionLost(f"{role}: no session {args[0]!r} here (the server was restarted, or the "
                                  "search dropped)")
            if method == "next" and self.window > 0:
                batched[role] = args
            else:
                out[role] = self.run(role, method, args)
        if batched:
            out.update(await self.enqueue(batched))
        return out

    def run(self, role: str, method: str, args: tuple):
        result = getattr(self.roles[role], method)(*args)
        if method == "close":
            self.client_of.pop(args[0], None)
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
        for sid in sids:
            self.client_of.pop(sid, None)

    def open_for(self, client: str | None, sid: str) -> None:
        """Record who opens `sid`; the client's older sessions belong to searches that died."""
        if client is not None:
            self.drop([s for s, c in self.client_of.items() if c == client and s != sid])
        self.client_of[sid] = client

    # ------------------------------------------------------------ dynamic batching of `next`

    async def enqueue(self, request: dict) -> dict:
        return await self.batcher.submit(request)

    def everyone_waiting(self, queued: list[dict]) -> bool:
        """No other session of these roles can join this batch: no point waiting out the window."""
        waiting = defaultdict(set)
        for request in queued:
            for role, (sid, _) in request.items():
                waiting[role].add(sid)
        return all(waiting[role] >= set(self.roles[role].sessions) for role in waiting)

    def next_merged(self, requests: list[dict]) -> list:
        """Every queued `next` request: one merged forward per role and model. A request whose session
        was dropped while it waited (its search died and was replaced) fails alone."""
        results: list = [{} for _ in requests]
        live = []
        for i, request in enumerate(requests):
            gone = [sid for role, (sid, _) in request.items() if sid not in self.roles[role].sessions]
            if gone:
                results[i] = SessionLost(f"session {gone[0]!r} was dropped while waiting")
            else:
                live.append(i)
        by_role = defaultdict(list)  # role -> [(request index, sid, new)]
        for i in live:
            for role, (sid, new) in requests[i].items():
                by_role[role].append((i, sid, new))
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
