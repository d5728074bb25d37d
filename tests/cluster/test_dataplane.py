"""The data plane through Ray: typed messages round-trip; in placement `separate` the search gets O(rows)
numbers per token step (never a vector over the vocabulary), the value vector goes server to server, and
the rows equal the in-process engine's; in placement `colocated` a shard runs with no per-token Ray call."""

import dataclasses
import json

import numpy as np
import pytest
import ray
import torch

from helpers.models import cell, config, rows
from helpers.reliability import content
from ivg.engine import Engine, needed_roles
from ivg.protocol import (Check, Chunk, Close, Closed, Cut, Cuts, Open, Opened, Problems, Sample, Sampled, Sampling,
                          Scores, Select, Step)
from pipeline.io import Shard
from pipeline.remote import RemoteRoles, ServerRef
from pipeline.servers import ModelServer

METHODS = [cell("implicit", "explicit"), cell("explicit", "implicit"), cell("none", "explicit")]


@ray.remote(num_cpus=0.1)
class Echo:
    def back(self, message):
        return message


def same(a, b) -> bool:
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def test_every_message_round_trips_through_ray(ray_local):
    ids, floats = np.array([3, -1, 7], dtype=np.int64), np.array([0.25, 0.5, 0.125])
    messages = [Open("s", ("a", "b"), (0, 1), Sampling(0.5, config([cell("none", "none")]).decode)), Opened(True),
                Select("s", ids), Step("s", ids), Sample("s", ids, floats, value_from="implicit"),
                Sampled(ids, floats), Sampled(ids, None), Chunk("s", ((1, 2), (3,)), ("x", "y")), Chunk("s", ((1,),), None),
                Scores(floats), Check(("a",), 4), Problems((None, "too long")), Cut(("a",), 4), Cuts((0, 3)),
                Close("s"), Closed({0: 5, 1: 7})]
    echo = Echo.remote()
    back = ray.get([echo.back.remote(m) for m in messages])
    assert all(same(m, b) for m, b in zip(messages, back))
    assert not same(messages[3], Step("s", ids + 1))  # the comparison can fail


class Recording(RemoteRoles):
    """The search's client, keeping everything the servers answer it."""

    received: list = []

    def call(self, messages):
        out = super().call(messages)
        self.received.append(out)
        return out


def walk(x):
    if dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            yield from walk(getattr(x, f.name))
    elif isinstance(x, dict):
        for v in x.values():
            yield from walk(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from walk(v)
    else:
        yield x


@pytest.mark.timeout(180)
def test_separate_placement_sends_tokens_not_distributions(ray_local):
    cfg = config(METHODS)
    actor = ray.remote(ModelServer).options(num_cpus=0.2)
    servers = [ServerRef(actor.remote(cfg, [role], 5.0), (role,)) for role in needed_roles(cfg)]
    local = Engine.local(cfg)
    roles = Recording(servers, "search-0", timeout_s=60)
    remote = Engine(cfg, roles, local.tokenizer, local.stopper.eos_ids)
    vocab = len(local.tokenizer)
    for method in METHODS:
        assert [content(r) for r in remote.run(rows(), method)] == [content(r) for r in local.run(rows(), method)]
    leaves = [x for out in roles.received for x in walk(out)]
    assert not any(isinstance(x, torch.Tensor) for x in leaves)
    arrays = [x for x in leaves if isinstance(x, np.ndarray)]
    assert arrays and all(x.ndim == 1 and x.shape[0] < vocab for x in arrays)  # per row, never per token id
    stats = roles.stats()
    assert stats["token_steps"] > 0 and stats["bytes_received_per_row_step"] < 8 * vocab / 4
    served = {s.roles[0]: ray.get(s.handle.stats.remote()) for s in servers}
    # the value vectors went from the value servers to the base, whole rows of the vocabulary
    assert served["base"]["value_bytes_in"] == served["base"]["value_rows_in"] * vocab * 8  # float64 models


@pytest.mark.timeout(120)
def test_colocated_shard_runs_beside_the_models_without_a_ray_call_per_token(ray_local):
    cfg = config(METHODS[:1])
    server = ray.remote(ModelServer).options(num_cpus=0.2).remote(cfg, needed_roles(cfg), 5.0, 1, 2)
    shards = [Shard(k, f"s{k}", tuple({**r, "error": None} for r in rows()[2 * k:2 * k + 2])) for k in range(2)]
    results = ray.get([server.run.remote(s) for s in shards])  # both at once: one batch of 4 prompts
    local = {r["id"]: content(r) for r in Engine.local(cfg).run(rows(), METHODS[0])}
    got = [r for res in results for r in res.table.to_pylist()]
    assert {r["id"]: content({k: v for k, v in r.items() if k != "shard"}) for r in got} == local
    assert [r["shard"] for r in got] == ["s0", "s0", "s1", "s1"]
    dtypes = json.loads(results[0].table.schema.metadata[b"ivg.dtypes"])  # what the models computed in
    assert dtypes == {"base": "float64", "implicit": "float64", "explicit": "float64"}
    stats = ray.get(server.stats.remote())
    assert stats.get("calls", 0) == 0 and stats["sessions_per_forward"] == {2: stats["forwards"]}
