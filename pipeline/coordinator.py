"""The coordinator: prompts -> shards -> search actors -> one Parquet file per shard.

  1. start the model servers (placement: an actor per role, or one for all) and the search actors;
  2. read prompts as Arrow record batches and cut stable shards; skip shards whose file exists;
  3. keep at most `max_in_flight` shards submitted (backpressure: reading never outruns searching),
     each to the least loaded search actor; every shard runs all methods, sharing the servers;
  4. check each result holds every (prompt, method) exactly once, write it atomically, record its
     rows and sha256 in the manifest, print progress; a shard that raised is retried, then marked failed.
Runs in the driver (`jobs/generate.py`). A driver killed at any moment loses only the shards in
flight: a rerun into the same directory skips every shard whose file matches the manifest (or, if the
driver died between writing a file and recording it, whose rows check out), and redoes the rest,
including truncated or corrupt files (moved to DIR/corrupt/ for a look).
"""

import math
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml

from ivg.config import ConfigError
from ivg.engine import check_vocabularies, needed_roles
from ivg.models import load_tokenizer
from pipeline.config import Config
from ivg.files import remove_stale_temps, sha256_file, write_text
from pipeline.io import Manifest, Shard, child_path, count_prompts, cut_shards, read_prompts, write_parquet_atomic
from pipeline.remote import ServerRef
from pipeline.search_actor import SearchActor, ShardResult
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
    searchers: list  # what runs a shard: SearchActor handles (separate), model servers (colocated)
    placement: str


def start_cluster(config: Config) -> Cluster:
    """Model servers and search actors, all starting at once (each imports torch: seconds).

    colocated: one server holds every role and runs the searches itself (no Ray call per token);
    `search_actors` is how many shards it takes at once (searcher k is replica k % replicas), and the
    shards it holds run as one batch. separate: a server per role, and `search_actors` SearchActors,
    searcher k using replica k % replicas of every server, so its sessions stay on one replica."""
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
        slots = math.ceil(p.search_actors / spec.replicas)
        servers[name] = [actor.remote(gen, served, p.batch_window_ms, spec.torch_threads, slots, config.data.columns,
                                      config.data.truncate) for _ in range(spec.replicas)]
    if placement == "colocated":
        searchers = [servers["colocated"][k % len(servers["colocated"])] for k in range(p.search_actors)]
    else:
        refs_for = [[ServerRef(handles[k % len(handles)], tuple(groups[name])) for name, handles in servers.items()]
                    for k in range(p.search_actors)]
        actor = ray.remote(SearchActor).options(num_cpus=p.search_cpus, max_restarts=p.max_restarts,
                                                max_task_retries=p.max_task_retries)
        searchers = [actor.remote(gen, refs, f"search-{k}", config.data.columns, config.data.truncate,
                                  p.call_timeout_s) for k, refs in enumerate(refs_for)]
    wait_started({f"model server {name}[{i}]": h.info.remote() for name, hs in servers.items()
                  for i, h in enumerate(hs)}, p.start_timeout_s)
    wait_started({f"search actor {k}": s.ready.remote() for k, s in enumerate(searchers)}, p.start_timeout_s)
    return Cluster(servers, searchers, placement)


def wait_started(refs: dict, timeout_s: float) -> None:
    """Wait for actors to come up; name the one that failed (its own error's last line) or never
    started (Ray queues an actor whose resources no node has: without a limit that is a silent hang)."""
    _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    for name, ref in refs.items():
        if ref in pending:
            raise RuntimeError(f"{name} did not start within pipeline.start_timeout_s={timeout_s:g}s; does the "
                               f"cluster have the resources it asks for (pipeline.servers, search_cpus)?")
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            cause = [line for line in str(e).splitlines() if line.strip()][-1]
            raise RuntimeError(f"{name} failed to start: {cause}") from None


def stop_cluster(cluster: Cluster) -> None:
    for handle in {id(h): h for h in cluster.searchers + [h for hs in cluster.servers.values() for h in hs]}.values():
        ray.kill(handle)


def tokenizers(config: Config) -> dict:
    found = {}
    for role in ("base", "tuned", "untuned", "explicit"):
        spec = getattr(config.models, role)
        if spec is None:
            continue
        try:
            found[role] = load_tokenizer(spec)
        except Exception as e:  # unknown hub id, missing folder, no tokenizer files: name the field
            raise ConfigError(f"models.{role}.name: cannot load {spec.name!r} ({type(e).__name__}: {e})") from None
    return found


def server_stats(cluster: Cluster) -> dict:
    return {f"{name}[{i}]": ray.get(h.stats.remote())
            for name, handles in cluster.servers.items() for i, h in enumerate(handles)}


def generate(config: Config, log=print) -> RunSummary:
    if config.run.output is None:
        raise ConfigError("run.output: needs an output directory (or --output DIR)")
    out = Path(config.run.output)
    # models and input are checked first, from tokenizers and the file's schema alone: a bad config
    # or input fails in seconds, before any actor loads weights and before anything is written
    check_vocabularies(config.generation, tokenizers(config))
    (out / "shards").mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(out / "manifest.json", config.resolved(), config.fingerprint())
    scheduler = Scheduler(config, manifest, out, log)
    write_text(out / "config.yaml", yaml.safe_dump(config.resolved(), sort_keys=False))
    remove_stale_temps(out / "shards", out)
    manifest.start_run(search_actors=config.pipeline.search_actors)
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
            path = self.path(shard)
            if path.exists():
                problem = self.verify(shard, path)
                if problem is None:
                    self.counts["skipped"] += 1
                    self.manifest.shard(shard.id, index=shard.index, state="done", prompts=len(shard.rows))
                    continue
                aside = self.out / "corrupt"  # kept for a look, outside shards/ where readers glob
                aside.mkdir(exist_ok=True)
                path.replace(child_path(aside, path.name))
                self.log(f"[generate] shard {shard.id}: {problem}; computing it again", file=sys.stderr)
            return shard, 1
        return None

    def verify(self, shard: Shard, path: Path) -> str | None:
        """Why the file at `path` is not this shard's complete output (None if it is). Its sha256 is
        compared with the manifest's; with none recorded (the driver died between writing the file
        and the manifest) the file is read whole and its rows checked, then its sha256 recorded."""
        recorded = self.manifest.data["shards"].get(shard.id, {}).get("sha256")
        if recorded is not None:
            return None if sha256_file(path) == recorded else "its sha256 is not the manifest's (truncated or corrupt)"
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            return f"unreadable ({e})"
        if (table.schema.metadata or {}).get(b"ivg.fingerprint") != self.config.fingerprint().encode():
            return "written by another config"
        if problem := self.missing_or_repeated(shard, table):
            return problem
        self.manifest.shard(shard.id, rows=table.num_rows, sha256=sha256_file(path))
        return None

    def missing_or_repeated(self, shard: Shard, table: pa.Table) -> str | None:
        """None if `table` holds every (prompt, method) of the shard exactly once."""
        got = Counter(zip(table.column("id").to_pylist(), table.column("method").to_pylist()))
        want = Counter((r["id"], m.label) for m in self.config.methods for r in shard.rows)
        if got == want:
            return None
        return f"rows missing {sorted(want - got)[:5]} or repeated/unexpected {sorted(got - want)[:5]}"

    def submit(self, shard: Shard, attempt: int) -> None:
        if self.cluster is None:
            self.cluster = start_cluster(self.config)
            self.start = time.perf_counter()  # rates count searching, not loading
        actor = min(range(len(self.load)), key=self.load.__getitem__)
        self.load[actor] += 1
        self.in_flight[self.cluster.searchers[actor].run.remote(shard)] = (shard, actor, attempt)
        self.manifest.shard(shard.id, index=shard.index, state="running", prompts=len(shard.rows),
                            attempts=attempt, sha256=None)

    def finished(self, shard: Shard, result: ShardResult, attempt: int) -> None:
        if problem := self.missing_or_repeated(shard, result.table):
            return self.failed(shard, attempt, RuntimeError(f"shard {shard.id}: {problem}"))
        digest = write_parquet_atomic(result.table, self.path(shard), {"ivg.shard": shard.id,
                                                                       "ivg.fingerprint": self.config.fingerprint()})
        self.counts["done"] += 1
        self.counts["prompts"] += len(shard.rows)
        self.manifest.shard(shard.id, state="done", rows=result.table.num_rows, failed_rows=result.failed_rows,
                            seconds=round(result.seconds, 3), attempts=attempt, error=None, sha256=digest)
        self.progress(f"shard {shard.id}: {len(shard.rows)} prompts x {len(self.config.methods)} methods in "
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
        return child_path(self.out / "shards", f"{shard.id}.parquet")

    def progress(self, what: str) -> None:
        c = self.counts
        seen = c["done"] + c["skipped"] + c["failed"]
        rate = c["prompts"] / max(time.perf_counter() - self.start, 1e-9)
        self.log(f"[generate] {seen}/{self.total or '?'} shards ({c['skipped']} skipped, {c['failed']} failed) "
                 f"| {rate:.2f} prompts/s | {what}", file=sys.stderr, flush=True)
