"""Model servers: the engine's roles (ivg/values.py) behind Ray actors, with dynamic batching.

A server holds one role (placement `separate`) or all of them (`colocated`).

Colocated, the search runs here, beside the models (`run(shard)`): the engine's LocalRoles, no Ray
call per token. Shards that arrive within `batch_window_ms` of each other (up to `search_slots`) run
as ONE larger batch: their prompts share every forward, and no cache is merged or split. (Measured
against merging the steps of concurrent searches: jobs/bench.py, README.) Searches run in a worker
thread, so the actor still answers `stats` and `ready` while one runs.

Separate, the server answers ivg/protocol.py messages from many search actors. Every search has its
own session: its own Streams, with their own KV caches. Per token step each search sends a `Step`
(value roles) or `Sample` (the base); within `batch_window_ms` the server gathers those of all
searches (closing the window early once every open session of the role is waiting) and runs ONE
forward per model for all of them (ivg.stream.feed_together: the sessions' caches merged, shorter
ones left-padded with masked columns, each session keeping a view of its rows afterwards; sessions
that step together again are merged without a copy). Then each caller finishes alone: a value role
puts its (rows, V) vector in the object store (it goes to the base, never to the search); the base
fetches the vector its Sample refers to, combines, warps, samples and answers a token and a value per
row. Other messages (Open, Select, Chunk, Check, Cut, Close) run as they arrive: per chunk, not per token.

Faults: sessions live in the server's memory, so a server that Ray restarted has none. A message for
a session it does not hold raises `SessionLost`, which the search actor treats as a lost process: the
shard runs again from the start. A search actor runs one search at a time, so when a client (search
actor) opens a session, any other session it still holds here was left by a search that died (or
by its previous life, before Ray restarted it) and is dropped: dead searches never leak caches.
"""

import logging
import os
from collections import Counter, defaultdict

import ray
import torch

from ivg.config import GenerationConfig
from ivg.engine import Engine, LocalRoles, eos_ids, load_role, needed_roles
from ivg.models import load_tokenizer
from ivg.protocol import PER_TOKEN, SESSION_MESSAGES, Close, Open, Sample, Step
from ivg.stream import feed_together
from pipeline.batching import Batcher
from pipeline.io import Shard
from pipeline.remote import SessionLost
from pipeline.search_actor import ShardResult, ShardRunner

__all__ = ["ModelServer", "SessionLost"]


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



def role_dtypes(roles: dict) -> dict[str, str]:
    """{role: the dtype its models compute in} (`dtype: auto` resolved), for every output's metadata."""
    return {name: ",".join(sorted({str(m.model.dtype).removeprefix("torch.") for m in role.models}))
            for name, role in roles.items()}


class CountedRoles(LocalRoles):
    """LocalRoles that count, per base step, how many searches (shards) the forward served."""

    def __init__(self, roles: dict, counts: Counter, per_forward: Counter):
        super().__init__(roles)
        self.counts, self.per_forward, self.searches = counts, per_forward, 1

    def call(self, messages: dict) -> dict:
        if any(isinstance(m, Sample) for m in messages.values()):
            self.counts["next_requests"] += self.searches
            self.counts["forwards"] += 1
            self.per_forward[self.searches] += 1
        return super().call(messages)


class ModelServer:
    """Serves `roles`. A plain class, so tests can drive it without Ray; the pipeline runs it as an
    async Ray actor (`ray.remote(ModelServer)`): one event loop, so messages never run concurrently,
    and per-token messages wait on a future until their batch has run."""

    def __init__(self, config: GenerationConfig, roles: list[str], batch_window_ms: float = 0.0,
                 torch_threads: int = 1, search_slots: int = 1, columns: tuple[str, ...] = (),
                 truncate: str = "fail"):
        torch.set_num_threads(torch_threads)
        self.threads = torch_threads
        warn_if_gpus_unseen(roles)
        self.base_tokenizer = load_tokenizer(config.models.base)
        self.roles = {name: load_role(name, config, self.base_tokenizer) for name in roles}
        self.window = batch_window_ms / 1000
        # per-token messages ({role: Step | Sample}) of many searches, fed in one forward per model
        self.batcher = Batcher(self.feed_merged, self.window, self.everyone_waiting)
        self.counts = Counter()  # per-token requests, forwards, merge seconds, value bytes, ...
        self.sessions_per_forward = Counter()  # {searches served by one forward: times}
        self.client_of: dict[str, str] = {}  # session id -> the client (search actor) that opened it
        self.runner = None
        if set(needed_roles(config)) <= set(roles):  # every role here: searches can run here too
            base = self.roles["base"].models[0]
            self.local = CountedRoles(self.roles, self.counts, self.sessions_per_forward)
            self.runner = ShardRunner(Engine(config, self.local, base.tokenizer,
                                             eos_ids(base.tokenizer, getattr(base.model, "generation_config", None)),
                                             truncate), columns, role_dtypes(self.roles))
            self.shards = Batcher(self.run_group, self.window, lambda queue: len(queue) >= search_slots,
                                  in_thread=True, max_size=search_slots)

    def info(self) -> dict:
        out = {"roles": sorted(self.roles), "dtypes": role_dtypes(self.roles)}
        if "base" in self.roles:
            loaded = self.roles["base"].models[0]
            out["eos"] = sorted(eos_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None)))
        return out

    def ready(self) -> int:
        return os.getpid()  # tells a test which process to kill, and that a restart happened

    def stats(self) -> dict:
        open_sessions = len(self.client_of) + (len(self.local.open_sessions) if self.runner else 0)
        return {**self.counts, "sessions_per_forward": dict(self.sessions_per_forward),
                "open_sessions": open_sessions}

    def reset_stats(self) -> None:
        """Start counting afresh (a benchmark's warm-up is not its measurement)."""
        self.counts.clear()
        self.sessions_per_forward.clear()

    # ------------------------------------------------------------ colocated: searches run here

    @ray.method(max_task_retries=0)  # a shard lost with this actor is the coordinator's to retry (and count)
    async def run(self, shard: Shard) -> ShardResult:
        if self.runner is None:
            raise RuntimeError(f"this server holds {sorted(self.roles)}, not every role a search needs")
        return await self.shards.submit(shard)

    def run_group(self, shards: list[Shard]) -> list[ShardResult]:
        torch.set_num_threads(self.threads)  # in the worker thread too: OpenMP's thread count is per thread
        self.local.searches = len(shards)
        return self.runner.run_group(shards)

    # ------------------------------------------------------------ separate: messages from search actors

    async def call(self, messages: dict, client: str | None = None) -> dict:
        """{role: message} -> {role: result}; per-token messages are batched across callers."""
        self.counts["calls"] += 1
        for role, m in messages.items():
            if isinstance(m, Open):
                self.open_for(client, m.sid)
            elif isinstance(m, SESSION_MESSAGES) and m.sid not in self.roles[role].sessions:
                # checked before anything runs or joins a batch: this caller fails alone
                raise SessionLost(f"{role}: no session {m.sid!r} here (the server was restarted, or the "
                                  "search dropped)")
        per_token = {role: m for role, m in messages.items() if isinstance(m, PER_TOKEN)}
        if per_token:
            if self.window > 0:
                await self.batcher.submit(per_token)
            else:
                [lost] = self.feed_merged([per_token])
                if lost is not None:
                    raise lost
        out = {role: self.roles[role].handle(m) for role, m in messages.items() if not isinstance(m, PER_TOKEN)}
        consumed = {m.value_from for m in per_token.values() if isinstance(m, Sample)}
        here = {}  # value vectors a Sample of this same call combines
        for role, m in per_token.items():
            if isinstance(m, Step):
                value = self.roles[role].value(self.session(role, m.sid))
                if role in consumed:
                    here[role], out[role] = value, None
                else:  # for a base elsewhere: into the object store, so that it goes server to server
                    # (a small result would be inlined to the caller, the search)
                    out[role] = ray.put(value) if ray.is_initialized() else value
        for role, m in per_token.items():
            if isinstance(m, Sample):
                value = here[m.value_from] if m.value_from in here else await self.value_of(m)
                out[role] = self.roles[role].sampled(self.session(role, m.sid), m, value)
        for m in messages.values():
            if isinstance(m, Close):
                self.client_of.pop(m.sid, None)
        return out

    async def value_of(self, m: Sample):
        """The v(s, .) a Sample combines, from the value server's answer it refers to (None: no guidance)."""
        if m.value_from is None:
            return None
        value = m.value
        if isinstance(value, ray.ObjectRef):
            value = (await value)[m.value_from]
        if isinstance(value, ray.ObjectRef):
            value = await value
        self.counts["value_bytes_in"] += value.numel() * value.element_size()  # server to server
        self.counts["value_rows_in"] += value.shape[0]
        return value

    def session(self, role: str, sid: str):
        session = self.roles[role].sessions.get(sid)
        if session is None:
            raise SessionLost(f"session {sid!r} was dropped while waiting")
        return session

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

    # ------------------------------------------------------------ dynamic batching of per-token messages

    def everyone_waiting(self, queued: list[dict]) -> bool:
        """No other session of these roles can join this batch: no point waiting out the window."""
        waiting = defaultdict(set)
        for request in queued:
            for role, m in request.items():
                waiting[role].add(m.sid)
        return all(waiting[role] >= set(self.roles[role].sessions) for role in waiting)

    def feed_merged(self, requests: list[dict]) -> list:
        """Feed every queued request's newest tokens: one merged forward per role and model. A request
        whose session was dropped while it waited (its search died and was replaced) fails alone."""
        results: list = [None] * len(requests)
        by_role = defaultdict(list)  # role -> [(request index, message)]
        for i, request in enumerate(requests):
            gone = [m.sid for role, m in request.items() if m.sid not in self.roles[role].sessions]
            if gone:
                results[i] = SessionLost(f"session {gone[0]!r} was dropped while waiting")
                continue
            for role, m in request.items():
                by_role[role].append(m)
        for name, messages in by_role.items():
            role = self.roles[name]
            sessions = [role.sessions[m.sid] for m in messages]
            tokens = [torch.as_tensor(m.tokens, dtype=torch.long) for m in messages]
            has = [t >= 0 for t in tokens]
            if any(bool(h.any()) for h in has):
                for j in range(len(role.models)):  # one forward per model (tuned, untuned: two)
                    _, overhead = feed_together([s.streams[j] for s in sessions],
                                                [t.clamp(min=0)[:, None] for t in tokens],
                                                [h.to(torch.long) for h in has])
                    self.counts["merge_s"] += overhead
            self.counts["next_requests"] += len(messages)
            self.counts["forwards"] += 1
            self.sessions_per_forward[len(messages)] += 1
        return results
