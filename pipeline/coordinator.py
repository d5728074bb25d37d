"""The coordinator: prompts -> shards -> search actors -> one Parquet file per shard.

  1. start the model servers (placement: an actor per role, or one for all) and the search actors;
  2. read prompts as Arrow record batches and cut stable shards; skip shards whose file exists;
  3. keep at most `max_in_flight` shards submitted (backpressure: reading never outruns searching),
     each to the least loaded search actor; every shard runs all methods, sharing the servers;
  4. check each result holds every (prompt, method) exactly once, write it atomically, record it
     in the manifest, print progress; a shard that raised is retried, then marked failed.
Runs in the driver (`jobs/generate.py`); an interrupt loses only the shards in flight.
"""

import math
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

from ivg.config import ConfigError
from ivg.engine import check_vocabularies
from ivg.models import load_tokenizer
from pipeline.config import Config
from pipeline.io import Manifest, Shard, count_prompts, cut_shards, read_prompts, remove_stale_temps, \
    write_parquet_atomic, write_text_atomic
from pipeline.remote import ServerRef
from pipeline.search_actor import SearchActor, ShardResult
from ivg.engine import needed_roles
from pipeline.servers import ModelServer


@dataclass(frozen=True)
class RunSummary:
    output: Path
    status: str  # finished | failed (some shard failed after its retries)
    done: int  # shards computed by this run
    skipped: int  # shards already on disk
    failed: int
    placement: str | None  # None when there was nothing to compute
    servers: dict  # server name -> its batching stats


@dataclass(frozen=True)
class Cluster:
    servers: dict[str, list]  # server name ("base", "colocated", ...) -> replica handles
    searchers: list  # SearchActor handles
    placement: str


def start_cluster(config: Config) -> Cluster:
    """Model servers and search actors, all starting at once (each imports torch: seconds)."""
    p, gen = config.pipeline, config.generation
    placement = p.placement
    if placement == "auto":
        placement = "separate" if ray.cluster_resources().get("GPU", 0) > 0 else "colocated"
    roles = needed_roles(gen)
    groups = {"colocated": roles} if placement == "colocated" else {r: [r] for r in roles}
    servers = {}
    for name, served in groups.items():
        spec = getattr(p.servers, name)
        actor = ray.remote(ModelServer).options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, resources=spec.resources or None,
            max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        servers[name] = [actor.remote(gen, served, p.batch_window_ms, spec.torch_threads)
                         for _ in range(spec.replicas)]
    # search actor k uses replica k % replicas of every server: its sessions stay on one replica
    refs_for = [[ServerRef(handles[k % len(handles)], tuple(groups[name])) for name, handles in servers.items()]
                for k in range(p.search_actors)]
    actor = ray.remote(SearchActor).options(num_cpus=p.search_cpus, max_restarts=p.max_restarts,
                                            max_task_retries=p.max_task_retries)
    searchers = [actor.remote(gen, refs, config.data.columns) for refs in refs_for]
    ray.get([s.ready.remote() for s in searchers])  # they wait for their servers: all are up
    return Cluster(servers, searchers, placement)


def stop_cluster(cluster: Cluster) -> None:
    for handle in cluster.searchers + [h for hs in cluster.servers.values() for h in hs]:
        ray.kill(handle)


def server_stats(cluster: Cluster) -> dict:
    return {f"{name}[{i}]": ray.get(h.stats.remote())
            for name, handles in cluster.servers.items() for i, h in enumerate(handles)}


def generate(config: Config, log=print) -> RunSummary:
    if config.run.output is None:
        raise ConfigError("run.output: needs an output directory (or --output DIR)")
    out = Path(config.run.output)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(out / "manifest.json", config.resolved(), config.fingerprint())
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config.resolved(), sort_keys=False))
    remove_stale_temps(out / "shards")
    # vocabularies are checked from tokenizers alone, before any actor loads weights
    check_vocabularies(config.generation, {r: load_tokenizer(getattr(config.models, r))
                                           for r in ("base", "tuned", "untuned", "explicit")
                                           if getattr(config.models, r)})
    manifest.start_run(search_actors=config.pipeline.search_actors)
    scheduler = Scheduler(config, manifest, out, log)
    status, stats = "error", {}
    try:
        counts = scheduler.run()
        status = "failed" if counts["failed"] else "finished"
        stats = server_stats(scheduler.cluster) if scheduler.cluster else {}
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        placement = scheduler.cluster.placement if scheduler.cluster else None
        manifest.end_run(status, placement=placement, servers=stats)
        if scheduler.cluster:
            stop_cluster(scheduler.cluster)
    return RunSummary(out, status, counts["done"], counts["skipped"], counts["failed"], placement, stats)


class Scheduler:
    """The submit / wait / write loop, with its bookkeeping in one place. The actors start with the
    first shard that needs computing: a rerun of a finished run loads no model."""

    def __init__(self, config: Config, manifest: Manifest, out: Path, log):
        self.config, self.manifest, self.out, self.log = config, manifest, out, log
        self.cluster: Cluster | None = None
        d = config.data
        batches = read_prompts(d.path, d.source, split=d.split, subset=d.subset, id_column=d.id_column,
                               prompt_column=d.prompt_column, columns=d.columns, batch_rows=d.read_batch_rows)
        self.shards = cut_shards(batches, config.pipeline.shard_size, d.limit)  # lazy: reads nothing yet
        self.total: int | None = None  # shards in the input, when cheap to know
        self.retry: deque[tuple[Shard, int]] = deque()
        self.in_flight: dict = {}  # object ref -> (shard, search actor, attempt)
        self.load = [0] * config.pipeline.search_actors  # shards in flight per search actor
        self.counts = Counter(done=0, skipped=0, failed=0, prompts=0)
        self.start = time.perf_counter()

    def run(self) -> Counter:
        d = self.config.data
        n = count_prompts(d.path, d.source)
        n = min(n, d.limit) if n is not None and d.limit else n
        self.total = math.ceil(n / self.config.pipeline.shard_size) if n is not None else None
        while True:
            while len(self.in_flight) < self.config.pipeline.in_flight and (item := self.next_shard()):
                self.submit(*item)
            if not self.in_flight:
                return self.counts
            [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
            shard, actor, attempt = self.in_flight.pop(ref)
            self.load[actor] -= 1
            try:
                result = ray.get(ref)
            except Exception as e:  # the search raised or its actor died: retry, then give up on it
                self.failed(shard, attempt, e)
            else:
                self.finished(shard, result, attempt)

    def next_shard(self) -> tuple[Shard, int] | None:
        if self.retry:
            return self.retry.popleft()
        for shard in self.shards:
            if self.path(shard).exists():  # the file is the truth: written atomically, so complete
                self.counts["skipped"] += 1
                self.manifest.shard(shard.id, index=shard.index, state="done", prompts=len(shard.rows))
                continue
            return shard, 1
        return None

    def submit(self, shard: Shard, attempt: int) -> None:
        if self.cluster is None:
            self.cluster = start_cluster(self.config)
            self.start = time.perf_counter()  # rates count searching, not loading
        actor = min(range(len(self.load)), key=self.load.__getitem__)
        self.load[actor] += 1
        self.in_flight[self.cluster.searchers[actor].run.remote(shard)] = (shard, actor, attempt)
        self.manifest.shard(shard.id, index=shard.index, state="running", prompts=len(shard.rows),
                            attempts=attempt)

    def finished(self, shard: Shard, result: ShardResult, attempt: int) -> None:
        methods = [m.label for m in self.config.methods]
        got = Counter(zip(result.table.column("id").to_pylist(), result.table.column("method").to_pylist()))
        want = Counter((r["id"], m) for m in methods for r in shard.rows)
        assert got == want, f"shard {shard.id}: rows missing or repeated: {(got - want) + (want - got)}"
        write_parquet_atomic(result.table, self.path(shard), {"ivg.shard": shard.id,
                                                              "ivg.fingerprint": self.config.fingerprint()})
        self.counts["done"] += 1
        self.counts["prompts"] += len(shard.rows)
        self.manifest.shard(shard.id, state="done", rows=result.table.num_rows, failed_rows=result.failed_rows,
                            seconds=round(result.seconds, 3), attempts=attempt, error=None)
        self.progress(f"shard {shard.id}: {len(shard.rows)} prompts x {len(methods)} methods in "
                      f"{result.seconds:.1f}s, {result.failed_rows} failed rows")

    def failed(self, shard: Shard, attempt: int, error: Exception) -> None:
        retries = self.config.pipeline.shard_retries
        if retries < 0 or attempt <= retries:
            self.retry.append((shard, attempt + 1))
            self.log(f"[generate] shard {shard.id} attempt {attempt} failed, retrying: {error!r}", file=sys.stderr)
            return
        self.counts["failed"] += 1
        self.manifest.shard(shard.id, state="failed", attempts=attempt, error=repr(error)[:2000])
        self.progress(f"shard {shard.id} FAILED after {attempt} attempts: {error!r}"[:500])

    def path(self, shard: Shard) -> Path:
        return self.out / "shards" / f"{shard.id}.parquet"

    def progress(self, what: str) -> None:
        c = self.counts
        seen = c["done"] + c["skipped"] + c["failed"]
        rate = c["prompts"] / max(time.perf_counter() - self.start, 1e-9)
        self.log(f"[generate] {seen}/{self.total or '?'} shards ({c['skipped']} skipped, {c['failed']} failed) "
                 f"| {rate:.2f} prompts/s | {what}", file=sys.stderr, flush=True)
