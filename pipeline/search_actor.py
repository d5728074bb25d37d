"""Search actors: chunk-level beam search over all prompts of a shard at once, for every method.

A search actor is the engine (ivg/engine.py) with a `RemoteRoles` client instead of local models:
`ivg.search` runs the W*K rows of every prompt in the shard as one batch, one `next` per token
step, against the model servers. Several search actors share the servers, which merge their steps.

Failures stay as small as they can: a prompt the input check or a model rejects is a failed row
(pipeline/io.py and the engine do that); a method that raises on the whole shard is run again prompt
by prompt, so one bad prompt fails alone. A lost server (actor died, restarted without its sessions,
or not answering within call_timeout_s) is not a row's fault: it propagates, and the coordinator
retries the shard. If this actor itself dies, Ray restarts it and runs its shard again.
"""

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
from pipeline.servers import SessionLost

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


class SearchActor:
    def __init__(self, config: GenerationConfig, servers: list[ServerRef], name: str, columns: tuple[str, ...] = (),
                 truncate: str = "fail", call_timeout_s: float = 600.0, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)  # sampling only; the models live in the servers
        self.roles = RemoteRoles(servers, name, call_timeout_s)  # the same name after a restart
        base = next(s.handle for s in self.roles.servers if "base" in s.roles)
        eos = ray.get(base.info.remote(), timeout=call_timeout_s)["eos"]  # the base model's EOS ids (its generation config too)
        self.engine = Engine(config, self.roles, load_tokenizer(config.models.base), set(eos), truncate)
        self.columns = columns

    def ready(self) -> int:
        return os.getpid()  # tells a test which process to kill, and that a restart happened

    def run(self, shard: Shard) -> ShardResult:
        start = time.perf_counter()
        rows = [out for method in self.engine.config.methods for out in self.run_method(list(shard.rows), method)]
        for out, row in zip(rows, [r for _ in self.engine.config.methods for r in shard.rows]):
            out["shard"] = shard.id
            out.update({c: row.get(c) for c in self.columns})
        failed = sum(r["status"] != "ok" for r in rows)
        return ShardResult(shard.id, rows_to_table(rows, self.columns), time.perf_counter() - start, failed)

    def run_method(self, rows: list[dict], method: MethodConfig) -> list[dict]:
        """One output row per input row, in order; a row the input check failed does not run."""
        good = [r for r in rows if r["error"] is None]
        outs = iter(self.guarded(good, method) if len(good) != 1 else self.alone(good[0], method))
        return [next(outs) if r["error"] is None else self.engine.row(r, method, None, r["error"], 0.0)
                for r in rows]

    def guarded(self, rows: list[dict], method: MethodConfig) -> list[dict]:
        try:
            return self.engine.run(rows, method) if rows else []
        except Exception as e:
            self.roles.drop_open_sessions()
            if isinstance(e, SYSTEM_ERRORS):
                raise
            return [out for r in rows for out in self.alone(r, method)]

    def alone(self, row: dict, method: MethodConfig) -> list[dict]:
        try:
            return self.engine.run([row], method)
        except Exception as e:
            self.roles.drop_open_sessions()
            if isinstance(e, SYSTEM_ERRORS):
                raise
            return [self.engine.row(row, method, None, f"{type(e).__name__}: {e}", 0.0)]
