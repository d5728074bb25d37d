"""The coordinator: prompts -> shards -> search actors -> one Parquet file per shard.

  1. start the model servers (placement: an actor per role, or one for all) and the search actors;
  2. read prompts as Arrow record batches and cut stable shards; skip shards whose file exists;
  3. keep at most `max_in_flight` shards submitted (backpressure: reading never outruns searching),
     each to the least loaded search actor; every shard runs all methods, sharing the servers;
  4. check each result holds every (prompt, method) exactly once, write it atomically, record its
     rows and sha256 in the manifest, print progress; a shard that raised is retried, then marked failed.
Runs in the driver (`jobs/generate.py`), one driver per output directory (DIR/.lock; a second one is
refused, the lock of a killed one taken over). A driver killed at any moment loses only the shards in
flight: a rerun into the same directory skips every shard whose file matches the manifest (or, if the
driver died between writing a file and recording it, whose rows check out), and redoes the rest,
including truncated or corrupt files and foreign entries of shards/ (moved to DIR/corrupt/ for a look)
and the shards of input rows edited since (moved to DIR/stale/; the manifest says which rows changed).

Nodes die: Ray restarts the actors they held wherever the resources are (max_restarts) and the shards
they were on run again. If no live node offers what an actor needs for pipeline.start_timeout_s (the
node never came back), the run fails with one line naming the resource; finished shards are kept.
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
from pipeline.capacity import check_capacity
from pipeline.io import Manifest, RunLock, Shard, child_path, count_prompts, cut_shards, read_prompts, row_identity, \
    set_aside, shard_entries, shard_rows, write_parquet_atomic
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
    searchers = [actor.remote(gen, refs, f"search-{k}", config.data.columns, config.data.truncate, p.call_timeout_s)
                 for k, refs in enumerate(refs_for)]
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
    for handle in cluster.searchers + [h for hs in cluster.servers.values() for h in hs]:
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
    # models, input and search shape are checked first, from tokenizers, model configs and the file's
    # schema alone: a bad config or input fails in seconds, before any actor loads weights and before
    # anything is written
    check_vocabularies(config.generation, tokenizers(config))
    check_capacity(config, ray.nodes(), input_prompts(config))
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    stale = lock.acquire()  # a second driver stops here, before touching anything
    try:
        if stale:
            log(f"[generate] {out}: took over the lock of a driver that is gone (pid {stale.get('pid')} on "
                f"{stale.get('host')}, since {stale.get('started')})", file=sys.stderr)
        return run_in(out, config, log)
    finally:
        lock.release()


def input_prompts(config: Config) -> int | None:
    d = config.data
    n = count_prompts(d.path, d.source)
    return min(n, d.limit) if n is not None and d.limit else n


def run_in(out: Path, config: Config, log) -> RunSummary:
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
        manifest.end_run(status, placement=placement, servers=stats, replaced=scheduler.replaced)
        if scheduler.cluster:
            stop_cluster(scheduler.cluster)
    return RunSummary(out, status, counts["done"], counts["skipped"], counts["failed"], placement, stats)


def shortfall(config: Config, placement: str, nodes: list[dict]) -> str | None:
    """What the run's actors need and the live nodes (ray.nodes()) do not offer in total, custom
    resources first, e.g. "base_gpu: 1 needed (pipeline.servers.base.resources.base_gpu), live nodes
    offer 0"; None if they offer everything."""
    p = config.pipeline
    wants = []  # (resource, amount, the field that asks for it)
    for name in ["colocated"] if placement == "colocated" else needed_roles(config.generation):
        spec = getattr(p.servers, name)
        for resource, amount in spec.demand().items():
            field = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(resource, f"resources.{resource}")
            wants.append((resource, amount * spec.replicas, f"pipeline.servers.{name}.{field}"))
    wants.append(("CPU", p.search_actors * p.search_cpus, "pipeline.search_cpus"))
    have, need = Counter(), Counter()
    for n in nodes:
        if n.get("Alive"):
            have.update(n["Resources"])
    for resource, amount, _ in wants:
        need[resource] += amount
    short = [r for r in sorted(need, key=lambda r: (r in ("CPU", "GPU"), r)) if have[r] + 1e-9 < need[r]]
    if not short:
        return None
    return "; ".join(f"{r}: {need[r]:g} needed ({', '.join(f for res, _, f in wants if res == r)}), live nodes "
                     f"offer {have[r]:g}" for r in short)


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
        # what shards/ holds: foreign entries go to corrupt/ now, files of edited rows to stale/ as
        # the shards that replace them are cut
        self.on_disk, foreign = shard_entries(out / "shards", out / "corrupt")
        for name in foreign:
            log(f"[generate] shards/{name}: not a shard file of this run (symlink, folder or other name); "
                "moved to corrupt/", file=sys.stderr)
        self.replaced: dict[str, dict] = {}  # new shard id -> {was: old shard id, changed_ids}
        self.short_since: float | None = None  # since when live nodes lack what the actors need
        self.watched = 0.0  # when watch() last asked Ray for the nodes

    def run(self) -> Counter:
        n = input_prompts(self.config)
        self.total = math.ceil(n / self.config.pipeline.shard_size) if n is not None else None
        while True:
            while len(self.in_flight) < self.config.pipeline.in_flight and (item := self.next_shard()):
                self.submit(*item)
            if not self.in_flight:
                return self.counts
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=self.poll_s)
            self.watch()
            if not ready:
                continue
            [ref] = ready
            shard, actor, attempt = self.in_flight.pop(ref)
            self.load[actor] -= 1
            try:
                result = ray.get(ref)
            except Exception as e:  # the search raised or its actor died: retry, then give up on it
                self.failed(shard, attempt, e)
            else:
                self.finished(shard, result, attempt)

    @property
    def poll_s(self) -> float:
        return min(2.0, self.config.pipeline.start_timeout_s / 4)

    def watch(self) -> None:
        """Every poll_s: fail the run once the live nodes have lacked what its actors need for
        start_timeout_s (a dead node that never came back); Ray restarts the actors when they do not.
        Checked whether or not results arrive: shards failing fast on a lost actor must not hide it."""
        if self.cluster is None or time.monotonic() - self.watched < self.poll_s:
            return
        self.watched = time.monotonic()
        missing = shortfall(self.config, self.cluster.placement, ray.nodes())
        if missing is None:
            self.short_since = None
            return
        self.short_since = self.short_since or time.monotonic()
        waited = time.monotonic() - self.short_since
        if waited > self.config.pipeline.start_timeout_s:
            raise RuntimeError(f"a node was lost and has not come back: {missing}, for {waited:.0f}s "
                               f"(pipeline.start_timeout_s={self.config.pipeline.start_timeout_s:g}); finished "
                               "shards are kept, a rerun computes the rest")

    def next_shard(self) -> tuple[Shard, int] | None:
        if self.retry:
            return self.retry.popleft()
        for shard in self.shards:
            self.replace_stale(shard)
            path = self.path(shard)
            if path.exists():
                problem = self.verify(shard, path)
                if problem is None:
                    self.counts["skipped"] += 1
                    self.manifest.shard(shard.id, index=shard.index, state="done", prompts=len(shard.rows))
                    continue
                set_aside(path, self.out / "corrupt")  # kept for a look, outside shards/ where readers glob
                self.log(f"[generate] shard {shard.id}: {problem}; computing it again", file=sys.stderr)
            return shard, 1
        for index in sorted(self.on_disk):  # the input ended: files of shards it no longer has
            for name in self.on_disk.pop(index):
                self.set_stale(name, None, None)
        return None

    def replace_stale(self, shard: Shard) -> None:
        """Files of this shard's index under another id hold rows of an earlier input: move them to
        stale/ and record which rows changed."""
        for name in self.on_disk.pop(shard.index, []):
            if name == f"{shard.id}.parquet":
                continue
            old = shard_rows(self.out / "shards" / name, self.config.data.columns)
            new = {r["id"]: row_identity(r) for r in shard.rows}
            changed = None if old is None else sorted(i for i in old.keys() | new.keys() if old.get(i) != new.get(i))
            self.set_stale(name, shard.id, changed)

    def set_stale(self, name: str, by: str | None, changed: list[str] | None) -> None:
        old_id = name.removesuffix(".parquet")
        set_aside(self.out / "shards" / name, self.out / "stale")
        self.manifest.shard(old_id, state="replaced", replaced_by=by)
        if by is not None:
            self.replaced[by] = {"was": old_id, "changed_ids": changed}
            self.manifest.shard(by, replaces=old_id, changed_ids=changed)
        if by is None:
            what = "its rows are no longer in the input"
        elif changed == []:
            what = f"the same rows under an id of an earlier ivg version; computed again as {by}"
        elif changed is None:
            what = f"its input rows changed; computed again as {by}"
        else:
            what = f"input rows {changed[:5]}{' ...' if len(changed) > 5 else ''} changed; computed again as {by}"
        self.log(f"[generate] shard {old_id}: {what}; its old file is in stale/", file=sys.stderr)

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
