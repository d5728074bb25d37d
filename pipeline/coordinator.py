"""The coordinator: prompts -> shards -> search actors -> one Parquet file per shard.

  1. start the model servers (placement: an actor per role, or one for all) and the search actors;
  2. read prompts as Arrow record batches and cut stable shards; skip shards whose file exists;
  3. keep at most `max_in_flight` shards submitted (backpressure: reading never outruns searching),
     each to the least loaded search actor; every shard runs all methods, sharing the servers;
  4. check each result holds every (prompt, method) exactly once, write it atomically, record its
     rows and sha256 in the manifest, print progress; a shard that raised is retried, then marked failed.
Before any of that, `preflight` checks what can be checked without an actor, in seconds and writing
nothing: the output directory, the models' tokenizers and vocabularies, the GPUs a local run asks for,
and the whole input. The jobs call it before Ray starts; a run that fails to start removes the output
directory it created, so a failed start leaves nothing behind.
Runs in the driver (`jobs/generate.py`). A driver killed at any moment loses only the shards in
flight: a rerun into the same directory skips every shard whose file matches the manifest (or, if the
driver died between writing a file and recording it, whose rows check out), and redoes the rest,
including truncated or corrupt files (moved to DIR/corrupt/ for a look).
"""

import json
import math
import logging
import os
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml

from ivg.config import ConfigError
from ivg.engine import check_vocabularies, needed_roles
from ivg.models import load_tokenizer
from pipeline.config import Config, PipelineConfig, ServerSpec
from ivg.files import remove_stale_temps, sha256_file, write_text
from pipeline.io import Manifest, Shard, child_path, cut_shards, read_prompts, write_parquet_atomic
from pipeline.remote import ServerRef
from pipeline.search_actor import SearchActor, ShardResult
from pipeline.servers import ModelServer

log = logging.getLogger(__name__)


class StartError(RuntimeError):
    """An actor could not start (its model failed to load, or no node has its resources)."""


@dataclass(frozen=True)
class Checked:
    """What preflight found: the size of the run, for the plan and the progress bar."""

    prompts: int  # input rows the run covers (after data.limit)
    shards: int
    fresh: bool  # the output directory does not exist yet


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
    """Model servers and search actors, all starting at once (each imports torch: seconds). Actors are
    named (`ivg-base-0`, `ivg-search-1`: the dashboard shows them so), and a search actor finds its
    servers by name, so no actor handle travels in a constructor's arguments.

    colocated: one server holds every role and runs the searches itself (no Ray call per token);
    `search_actors` is how many shards it takes at once (searcher k is replica k % replicas), and the
    shards it holds run as one batch. separate: a server per role, and `search_actors` SearchActors,
    searcher k using replica k % replicas of every server, so its sessions stay on one replica."""
    p, gen = config.pipeline, config.generation
    roles = needed_roles(gen)
    placement, specs = plan_servers(p, roles, ray.cluster_resources().get("GPU", 0))
    groups = {"colocated": roles} if placement == "colocated" else {r: [r] for r in roles}
    servers = {}
    for name, served in groups.items():
        spec = specs[name]
        options = dict(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, resources=spec.resources or None,
                       max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        slots = math.ceil(p.search_actors / spec.replicas)  # shards a colocated server takes at once
        servers[name] = {f"ivg-{name}-{i}": ray.remote(ModelServer).options(name=f"ivg-{name}-{i}", **options).remote(
            gen, served, p.batch_window_ms, spec.torch_threads, slots, config.data.columns, config.data.truncate)
            for i in range(spec.replicas)}
    if placement == "colocated":
        replicas = list(servers["colocated"].values())
        searchers = [replicas[k % len(replicas)] for k in range(p.search_actors)]
    else:
        refs_for = [[ServerRef(list(named)[k % len(named)], tuple(groups[name])) for name, named in servers.items()]
                    for k in range(p.search_actors)]
        options = dict(num_cpus=p.search_cpus, max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        searchers = [ray.remote(SearchActor).options(name=f"ivg-search-{k}", **options).remote(
            gen, refs, f"search-{k}", config.data.columns, config.data.truncate, p.call_timeout_s)
            for k, refs in enumerate(refs_for)]
    cluster = Cluster({name: list(named.values()) for name, named in servers.items()}, searchers, placement)
    try:
        wait_started({f"model server {name}": h.info.remote() for named in servers.values() for name, h in named.items()},
                     p.start_timeout_s)
        if placement == "separate":
            wait_started({f"search actor ivg-search-{k}": s.ready.remote() for k, s in enumerate(searchers)},
                         p.start_timeout_s)
    except BaseException:  # the others may be up: stop them, and free their names for the next run
        stop_cluster(cluster)
        raise
    return cluster


def plan_servers(p: PipelineConfig, roles: list[str], cluster_gpus: float) -> tuple[str, dict[str, ServerSpec]]:
    """The placement and each server's resources on this cluster. `placement: auto` is an actor per role
    when the cluster has a GPU for each of them, else one actor for all; a server whose num_gpus is
    unset (null) gets one GPU when the cluster has any, else none. Asking for more GPUs than the
    cluster has is said loudly: the servers wait for GPU nodes (an autoscaler may add some) until
    pipeline.start_timeout_s."""
    def gpus(spec: ServerSpec) -> ServerSpec:
        return replace(spec, num_gpus=(1.0 if cluster_gpus > 0 else 0.0) if spec.num_gpus is None else spec.num_gpus)

    separate = {r: gpus(getattr(p.servers, r)) for r in roles}
    placement = p.placement
    if placement == "auto":
        wanted = sum(s.num_gpus * s.replicas for s in separate.values())
        placement = "separate" if cluster_gpus > 0 and wanted <= cluster_gpus else "colocated"
    specs = {"colocated": gpus(p.servers.colocated)} if placement == "colocated" else separate
    wanted = sum(s.num_gpus * s.replicas for s in specs.values())
    if wanted > cluster_gpus:
        log.warning("pipeline.servers ask for %g GPU(s) (%s) but the cluster has %g: the servers wait for GPU "
                    "nodes until pipeline.start_timeout_s=%gs", wanted,
                    ", ".join(f"{n}: {s.num_gpus:g} x {s.replicas}" for n, s in specs.items() if s.num_gpus),
                    cluster_gpus, p.start_timeout_s)
    return placement, specs


def wait_started(refs: dict, timeout_s: float) -> None:
    """Wait for actors to come up; name the one that failed (its own error's last line) or never
    started (Ray queues an actor whose resources no node has: without a limit that is a silent hang)."""
    _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    for name, ref in refs.items():
        if ref in pending:
            raise StartError(f"{name} did not start within pipeline.start_timeout_s={timeout_s:g}s; does the "
                             f"cluster have the resources it asks for (pipeline.servers, search_cpus)?")
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            cause = [line for line in str(e).splitlines() if line.strip()][-1]
            raise StartError(f"{name} failed to start: {cause}") from None


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


def preflight(config: Config, local: bool = False) -> Checked:
    """Every check that needs no actor, in seconds and writing nothing: the config can be generated
    as it is, the output directory, the GPUs a local run asks for (`local`: the Ray this process
    starts, on this machine), the whole input (readable, its columns, ids unique) and the models'
    tokenizers and vocabularies. Raises ConfigError / InputError naming the field, file or row."""
    generation = config.generation  # refuses a config whose guides jobs.run trains first
    fresh = check_output(config)
    if local:
        check_local_gpus(config)
    d = config.data
    prompts = shards = 0
    for shard in cut_shards(read_input(config), config.pipeline.shard_size, d.limit):
        prompts, shards = prompts + len(shard.rows), shards + 1
    check_vocabularies(generation, tokenizers(config))
    return Checked(prompts, shards, fresh)


def check_output(config: Config) -> bool:
    """run.output is set, writable, and not another config's; True if it does not exist yet."""
    if config.run.output is None:
        raise ConfigError("run.output: needs an output directory (--output DIR)")
    out = Path(config.run.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output: {out} exists and is not a directory")
    manifest = out / "manifest.json"
    if manifest.exists():  # Manifest.open refuses it again when the run starts
        try:
            theirs = json.loads(manifest.read_text()).get("fingerprint")
        except (OSError, ValueError) as e:
            raise ConfigError(f"run.output: {manifest} cannot be read ({e}); fix it or use a new output directory") from None
        if theirs != config.fingerprint():
            raise ConfigError(f"run.output: {out} holds outputs of another config (fingerprint {theirs} != "
                              f"{config.fingerprint()}); use a new output directory")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output: cannot write to {existing}")
    return not out.exists()


def check_local_gpus(config: Config) -> None:
    """On this machine, CUDA is what torch sees: a role that needs a GPU it does not have would wait
    (num_gpus) or fail at load (device: cuda) after every other actor started."""
    import torch

    have = torch.cuda.device_count()
    for role in ("base", "tuned", "untuned", "explicit"):
        spec = getattr(config.models, role)
        if spec is not None and spec.device.startswith("cuda") and not have:
            raise ConfigError(f"models.{role}.device: {spec.device!r} but torch sees no CUDA device on this machine "
                              f"(torch {torch.__version__}); use device: auto, or join a GPU cluster with --address")
    asked = {name: getattr(config.pipeline.servers, name).num_gpus for name in ("base", "implicit", "explicit", "colocated")}
    for name, n in asked.items():
        if n and n > have:
            raise ConfigError(f"pipeline.servers.{name}.num_gpus: asks for {n:g} GPU(s) but this machine has {have}; "
                              "set it to 0 (or null), or join a GPU cluster with --address")


def read_input(config: Config):
    d = config.data
    return read_prompts(d.path, d.source, split=d.split, subset=d.subset, id_column=d.id_column,
                        prompt_column=d.prompt_column, columns=d.columns, batch_rows=d.read_batch_rows)


def generate(config: Config, log=print, checked: Checked | None = None) -> RunSummary:
    """Run every method over the input into config.run.output; `checked` is preflight's result when the
    caller ran it already (the jobs do, before Ray starts)."""
    checked = checked or preflight(config)
    out = Path(config.run.output)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(out / "manifest.json", config.resolved(), config.fingerprint())
    scheduler = Scheduler(config, manifest, out, log, checked)
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
        scheduler.progress.close()
        placement = scheduler.cluster.placement if scheduler.cluster else None
        manifest.end_run(status, placement=placement, servers=stats)
        if scheduler.cluster:
            stop_cluster(scheduler.cluster)
        if status in ("error", "interrupted") and checked.fresh and not scheduler.counts["done"]:
            shutil.rmtree(out, ignore_errors=True)  # a failed start leaves nothing behind
    return RunSummary(out, status, counts["done"], counts["skipped"], counts["failed"], placement, stats)


class Scheduler:
    """The submit / wait / write loop, with its bookkeeping in one place. The actors start with the
    first shard that needs computing: a rerun of a finished run loads no model."""

    def __init__(self, config: Config, manifest: Manifest, out: Path, log, checked: Checked):
        self.config, self.manifest, self.out, self.log = config, manifest, out, log
        self.cluster: Cluster | None = None
        self.shards = cut_shards(read_input(config), config.pipeline.shard_size, config.data.limit)  # lazy
        self.total = checked.shards
        self.retry: deque[tuple[Shard, int]] = deque()
        self.in_flight: dict = {}  # object ref -> (shard, search actor, attempt)
        self.load = [0] * config.pipeline.search_actors  # shards in flight per search actor
        self.counts = Counter(done=0, skipped=0, failed=0, prompts=0)
        self.progress = Progress(checked.prompts, log)

    def run(self) -> Counter:
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
                    self.progress.skipped(len(shard.rows))
                    self.manifest.shard(shard.id, index=shard.index, state="done", prompts=len(shard.rows))
                    continue
                aside = self.out / "corrupt"  # kept for a look, outside shards/ where readers glob
                aside.mkdir(exist_ok=True)
                path.replace(child_path(aside, path.name))
                self.progress.say(f"[generate] shard {shard.id}: {problem}; computing it again")
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
            self.progress.say(f"[load] starting the model servers ({', '.join(needed_roles(self.config.generation))}) "
                              f"and {self.config.pipeline.search_actors} search actor(s)")
            start = time.perf_counter()
            self.cluster = start_cluster(self.config)
            self.progress.say(f"[load] ready in {time.perf_counter() - start:.0f}s: placement {self.cluster.placement}, "
                              f"servers {', '.join(f'{n} x {len(h)}' for n, h in self.cluster.servers.items())}")
            self.progress.start()  # rates count searching, not loading
        actor = min(range(len(self.load)), key=self.load.__getitem__)
        self.load[actor] += 1
        self.in_flight[self.cluster.searchers[actor].run.remote(shard)] = (shard, actor, attempt)
        self.manifest.shard(shard.id, index=shard.index, state="running", prompts=len(shard.rows),
                            attempts=attempt, sha256=None)

    def finished(self, shard: Shard, result: ShardResult, attempt: int) -> None:
        if problem := self.missing_or_repeated(shard, result.table):
            return self.failed(shard, attempt, RuntimeError(f"shard {shard.id}: {problem}"))
        digest = write_parquet_atomic(result.table, self.path(shard), {
            "ivg.shard": shard.id, "ivg.fingerprint": self.config.fingerprint(),
            "ivg.config": json.dumps(self.config.resolved())})  # each file says what made it
        self.counts["done"] += 1
        self.counts["prompts"] += len(shard.rows)
        self.progress.done(len(shard.rows))
        self.manifest.shard(shard.id, state="done", rows=result.table.num_rows, failed_rows=result.failed_rows,
                            seconds=round(result.seconds, 3), attempts=attempt, error=None, sha256=digest)
        self.shards_line(f"shard {shard.id}: {len(shard.rows)} prompts x {len(self.config.methods)} methods in "
                      f"{result.seconds:.1f}s, {result.failed_rows} failed rows")

    def failed(self, shard: Shard, attempt: int, error: Exception) -> None:
        retries = self.config.pipeline.shard_retries
        if retries < 0 or attempt <= retries:
            self.retry.append((shard, attempt + 1))
            self.progress.say(f"[generate] shard {shard.id} attempt {attempt} failed, retrying: {error!r}")
            return
        self.counts["failed"] += 1
        self.progress.done(len(shard.rows))
        self.manifest.shard(shard.id, state="failed", attempts=attempt, error=repr(error)[:2000])
        self.shards_line(f"shard {shard.id} FAILED after {attempt} attempts: {error!r}"[:500])

    def path(self, shard: Shard) -> Path:
        return child_path(self.out / "shards", f"{shard.id}.parquet")

    def shards_line(self, what: str) -> None:
        c = self.counts
        seen = c["done"] + c["skipped"] + c["failed"]
        self.progress.say(f"{seen}/{self.total} shards ({c['skipped']} skipped, {c['failed']} failed) | {what}",
                          meter=True)


class Progress:
    """Prompts done / total, rate, elapsed and ETA: a live tqdm bar on a terminal; elsewhere (a `ray job`
    log, a file) the bar's numbers on each shard's line. The rate counts prompts computed since the
    servers were up (loading is a phase of its own; skipped shards cost nothing)."""

    def __init__(self, total: int, log, live: bool | None = None, file=None):
        from tqdm import tqdm

        self.log, self.total, self.file = log, total, file or sys.stderr
        self.live = log is print and self.file.isatty() if live is None else live
        self.bar = tqdm(total=total, unit=" prompts", desc="[generate]", file=self.file, smoothing=0,
                        dynamic_ncols=True, disable=not self.live)
        self.n = self.initial = 0  # prompts accounted for; of those, skipped before the servers were up
        self.started = None

    def start(self) -> None:
        self.started = time.perf_counter()
        self.initial = self.n
        if self.live:
            self.bar.reset(total=self.total)
            self.bar.initial = self.bar.n = self.n
            self.bar.refresh()

    def skipped(self, n: int) -> None:
        self.initial += n if self.started is not None else 0  # a skipped shard is no work: not in the rate
        self.advance(n)

    def done(self, n: int) -> None:
        self.advance(n)

    def advance(self, n: int) -> None:
        self.n += n
        if self.live:
            self.bar.initial = self.initial
            self.bar.update(n)

    def meter(self) -> str:
        from tqdm import tqdm

        elapsed = time.perf_counter() - self.started if self.started is not None else 0.0
        return tqdm.format_meter(self.n, self.total, elapsed, ncols=0, unit=" prompts", initial=self.initial)

    def say(self, line: str, meter: bool = False) -> None:
        """A line above the bar; `meter`: a shard's line, which carries the bar's numbers off a terminal."""
        if self.live:
            self.bar.write(f"[generate] {line}" if meter else line, file=self.file)
        else:
            self.log(f"[generate] {self.meter()} | {line}" if meter else line, file=self.file, flush=True)

    def close(self) -> None:
        self.bar.close()
