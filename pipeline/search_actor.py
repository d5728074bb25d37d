"""Searches over shards: chunk-level beam search over all prompts of a shard at once, for every method.

`ShardRunner` is the engine (ivg/engine.py) over some roles client, turning shards into result tables.
It runs where the placement puts the search:
  colocated  inside the model server that holds every role (pipeline/servers.py): the engine's
             `LocalRoles`, no Ray call per token; the shards queued there run as one larger batch.
  separate   in a `SearchActor` of its own, with a `RemoteRoles` client: per token step it sends the
             servers the newest token ids and one uniform per row, and gets back a token and a value
             per row (pipeline/remote.py). Several search actors share the servers, which merge their steps.

Failures stay as small as they can: a prompt the input check or a model rejects is a failed row
(pipeline/io.py and the engine do that); a method that raises on a batch is run again shard by shard,
then prompt by prompt, so one bad prompt fails alone. A lost server (actor died, restarted without
its sessions, or not answering within call_timeout_s) is not a row's fault: it propagates, and the
coordinator retries the shard. If the process running the search dies, Ray restarts it and the
coordinator runs its shards again.
"""

import json
import os
import time
from dataclasses import dataclass

import pyarrow as pa
import ray
import torch

from ivg.config import GenerationConfig, MethodConfig
from ivg.engine import Engine
from ivg.models import load_tokenizer
from pipeline.io import Shard, rows_to_table
from pipeline.remote import RemoteRoles, ServerRef
from pipeline.remote import SessionLost

# The cluster lost a process (or its state): retry the shard rather than blame its prompts.
SYSTEM_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                 ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError,
                 ray.exceptions.GetTimeoutError, SessionLost)


@dataclass(frozen=True)
class ShardResult:
    shard_id: str
    table: pa.Table  # [prompts * methods] rows of pipeline.io.OUTPUT_SCHEMA + carried columns
    seconds: float
    failed_rows: int


class ShardRunner:
    """Shards in, result tables out, through `engine` (whose roles client has drop_open_sessions).
    `dtypes` ({role: dtype its models ran in}) goes into every table's metadata (`ivg.dtypes`)."""

    def __init__(self, engine: Engine, columns: tuple[str, ...] = (), dtypes: dict[str, str] | None = None):
        self.engine, self.columns = engine, columns
        self.metadata = {"ivg.dtypes": json.dumps(dtypes or {}, sort_keys=True)}

    def run(self, shard: Shard) -> ShardResult:
        return self.run_group([shard])[0]

    def run_group(self, shards: list[Shard]) -> list[ShardResult]:
        """Several shards as one batch per method (their prompts share every forward)."""
        start = time.perf_counter()
        rows = [r for s in shards for r in s.rows]
        per_method = [self.run_method(rows, method, [len(s.rows) for s in shards])
                      for method in self.engine.config.methods]
        seconds, results, at = time.perf_counter() - start, [], 0
        for shard in shards:
            span = slice(at, at + len(shard.rows))
            at = span.stop
            out = [o for outs in per_method for o in outs[span]]
            for o, row in zip(out, [r for _ in self.engine.config.methods for r in shard.rows]):
                o["shard"] = shard.id
                o.update({c: row.get(c) for c in self.columns})
            failed = sum(o["status"] != "ok" for o in out)
            table = rows_to_table(out, self.columns)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata})
            results.append(ShardResult(shard.id, table, seconds, failed))
        return results

    def run_method(self, rows: list[dict], method: MethodConfig, sizes: list[int]) -> list[dict]:
        """One output row per input row, in order; a row the input check failed does not run. A batch
        that raises runs again shard by shard (`sizes`: rows per shard), then prompt by prompt."""
        good = [r for r in rows if r["error"] is None]
        if len(sizes) > 1:
            try:
                outs = iter(self.engine.run(good, method) if good else [])
            except Exception as e:
                self.engine.roles.drop_open_sessions()
                if isinstance(e, SYSTEM_ERRORS):
                    raise
                starts = [sum(sizes[:k]) for k in range(len(sizes))]
                return [o for a, n in zip(starts, sizes) for o in self.run_method(rows[a:a + n], method, [n])]
        else:
            outs = iter(self.guarded(good, method) if len(good) != 1 else self.alone(good[0], method))
        return [next(outs) if r["error"] is None else self.engine.row(r, method, None, r["error"], 0.0)
                for r in rows]

    def guarded(self, rows: list[dict], method: MethodConfig) -> list[dict]:
        try:
            return self.engine.run(rows, method) if rows else []
        except Exception as e:
            self.engine.roles.drop_open_sessions()
            if isinstance(e, SYSTEM_ERRORS):
                raise
            return [out for r in rows for out in self.alone(r, method)]

    def alone(self, row: dict, method: MethodConfig) -> list[dict]:
        try:
            return self.engine.run([row], method)
        except Exception as e:
            self.engine.roles.drop_open_sessions()
            if isinstance(e, SYSTEM_ERRORS):
                raise
            return [self.engine.row(row, method, None, f"{type(e).__name__}: {e}", 0.0)]


class SearchActor(ShardRunner):
    """The search of placement `separate`: the engine with a RemoteRoles client to the model servers."""

    def __init__(self, config: GenerationConfig, servers: list[ServerRef], name: str, columns: tuple[str, ...] = (),
                 truncate: str = "fail", call_timeout_s: float = 600.0, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)  # bookkeeping only; the models live in the servers
        self.roles = RemoteRoles(servers, name, call_timeout_s)  # the same name after a restart
        infos = ray.get([s.handle.info.remote() for s in self.roles.servers], timeout=call_timeout_s)
        eos = next(i["eos"] for i in infos if "eos" in i)  # the base model's EOS ids (its generation config too)
        dtypes = {role: dtype for i in infos for role, dtype in i["dtypes"].items()}
        super().__init__(Engine(config, self.roles, load_tokenizer(config.models.base), set(eos), truncate), columns,
                         dtypes)

    def ready(self) -> int:
        return os.getpid()  # tells a test which process to kill, and that a restart happened

    def stats(self) -> dict:
        return self.roles.stats()
