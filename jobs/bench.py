"""Benchmarks behind "same method, much faster": `python -m jobs.bench --suite quick --out bench.json`.

One process measures, per model family (tiny random models; SmolLM2-135M-Instruct), the IVG cell
token-wise implicit + chunk-level explicit at W,K,L = 4,4,5, medians over repeats:

  speedup_vs_naive     engine prompts/s over a fair research-code baseline (NaiveIVG below)
  forward_fraction     share of the engine's decode wall time spent inside model forwards
  chunk_scoring_ratio  time of the 20th chunk-scoring call over the 1st (100 new tokens)
  pipeline_vs_engine   the Ray pipeline's wall time over the in-process engine's, same prompts
  batch_scaling        engine prompts/s at 1, 4, 16, 64 prompts per batch
  actor_scaling        pipeline prompts/s with 1 and 2 search actors
  peak_rss_mb          RSS each role's models add when loaded, and the process's peak

Decoding runs a fixed length (no stop strings, no EOS) so both sides sample exactly the same number
of tokens. SmolLM2 stands in for every role (two copies as tuned/untuned, one loaded as a token
reward model): the guidance is meaningless but every forward has the real cost. The JSON records
machine, versions, models and settings; a Markdown table is printed at the end.
Suites: smoke (tiny only, < 1 min, for tests), quick (< 5 min on 2 CPU cores), full; and cluster:
the pipeline on a multi-node cluster on this machine, prompts/s against model-server replicas and
search actors, and the bytes that cross between nodes per token step (< 6 min).
On a GPU machine: `--device cuda`.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ivg.config import DecodeConfig, GenerationConfig, MethodConfig, Models, ModelSpec
from ivg.engine import Engine, load_role, needed_roles
from ivg.models import LoadedModel, load_tokenizer, pad_id, prompt_ids
from ivg.provenance import git_revision, versions
from ivg.profiling import ForwardTimer, record_calls, synchronize
from ivg.reference import naive_search

METHOD = MethodConfig(token="implicit", chunk="explicit", W=4, K=4, L=5)
NEW_TOKENS = 48
SCORED_CHUNKS = 20  # chunk_scoring_ratio compares chunk 20 with chunk 1
TARGETS = {"speedup_vs_naive": (">=", 10.0), "forward_fraction": (">=", 0.75),
           "chunk_scoring_ratio": ("<=", 1.3), "pipeline_vs_engine": ("<=", 1.2)}
# IMDB-like openings (the paper's first task); prompt i is OPENINGS[i % 16], made unique by its index.
OPENINGS = [
    "I went into this movie expecting very little, and", "The first thing you notice about this film is",
    "After twenty minutes I wanted to leave, but", "My wife dragged me to see this one and",
    "Honestly, the acting in this picture", "This is the kind of sequel that", "The director clearly loves",
    "I have seen a lot of war films, and this", "Nothing about the plot makes sense:",
    "The soundtrack alone is reason enough to", "As a fan of the original novel, I",
    "Every scene with the villain", "The cinematography is gorgeous, yet", "Kids will probably enjoy",
    "I rented this on a rainy Sunday and", "Three hours long, and",
]


@dataclass(frozen=True)
class Workload:
    """What one suite measures on one model family."""
    prompts: int  # prompts of the speedup / forward-fraction runs (one engine batch)
    naive_prompts: int  # of those, how many the naive baseline decodes (it is per prompt anyway)
    reference_prompts: int  # decoded by ivg/reference.py too (0: skip; it has no caches at all)
    repeats: int
    batch_sizes: tuple[int, ...]  # () skips batch_scaling
    chunk_prompts: int  # prompts of the 20-chunk run (0: skip)
    pipeline: bool  # run the Ray pipeline (pipeline_vs_engine, actor_scaling)


SUITES = {
    "smoke": {"tiny": Workload(4, 2, 0, 1, (1, 4), 2, False)},
    "quick": {"tiny": Workload(16, 4, 1, 3, (1, 4, 16, 64), 16, True),
              "smollm2-135m": Workload(2, 1, 0, 1, (), 0, False)},
    "full": {"tiny": Workload(16, 16, 2, 5, (1, 4, 16, 64), 16, True),
             "smollm2-135m": Workload(16, 4, 0, 3, (1, 4, 16, 64), 16, True)},
}


def family_models(family: str, device: str) -> Models:
    if family == "tiny":
        spec = lambda name, kind="causal_lm": ModelSpec(name, kind=kind, device=device)
        return Models(base=spec("tiny:base"), tuned=spec("tiny:tuned"), untuned=spec("tiny:untuned"),
                      explicit=spec("tiny:trm", "token_reward"))
    spec = lambda kind="causal_lm": ModelSpec("asset:smollm2-135m-instruct", kind=kind, device=device)
    return Models(base=spec(), tuned=spec(), untuned=spec(), explicit=spec("token_reward"))


def bench_rows(n: int) -> list[dict]:
    return [{"id": f"bench-{i:03d}", "prompt": f"{OPENINGS[i % len(OPENINGS)]}" + (f" ({i})" if i >= 16 else "")}
            for i in range(n)]


# ---------------------------------------------------------------- the yardstick: IVG as research code runs it

class NaiveImplicitGuidance(LogitsProcessor):
    """EFT inside HF generate, as research scripts do it: the tuned/untuned pair runs in the logits
    processor, each with its own KV cache for the length of this generate call (then thrown away)."""

    def __init__(self, tuned: LoadedModel, untuned: LoadedModel, prefixes: list[list[int]], beta: float):
        self.models, self.prefixes, self.beta = (tuned, untuned), prefixes, beta
        self.state = None  # per model: (cache, mask)
        self.tokens = 0  # real (unpadded) tokens fed to the two models

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logps, state = [], []
        for k, m in enumerate(self.models):
            if self.state is None:  # first step: encode the whole prefix
                ids, mask = left_pad(self.prefixes, pad_id(m.tokenizer), m.device)
                cache = None
            else:  # then only the token sampled last
                cache, mask = self.state[k]
                ids = input_ids[:, -1:]
                mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            out = lm_call(m.model, ids, mask, cache, keep=1)
            self.tokens += int(mask[:, -ids.shape[1]:].sum())
            logps.append(torch.log_softmax(out.logits[:, -1].float(), -1))
            state.append((out.past_key_values, mask))
        self.state = state
        return scores + self.beta * (logps[0] - logps[1])


def lm_call(model, ids, mask, cache, keep):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=cache is not None or keep == 1, logits_to_keep=keep)


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


class NaiveIVG:
    """The same IVG cell the way the weak-to-strong-search / CBS scripts run it: one prompt at a time;
    each chunk sampled by HF `generate` over that prompt's W*K rows (a fresh KV cache per call, so every
    chunk re-encodes the whole prefix); then the scorer re-encodes every whole prefix. Fair to it: the
    scorer computes only the logits it reads (logits_to_keep=2), and there are no stop strings to check."""

    def __init__(self, models: dict[str, LoadedModel], method: MethodConfig, decode: DecodeConfig):
        self.m, self.method, self.decode = models, method, decode
        self.tokens = 0  # real (unpadded) tokens fed to all models, as the engine's model_tokens count them

    @torch.no_grad()
    def run(self, prompt: str) -> list[int]:
        W, K, L = self.method.W, self.method.K, self.method.L
        heads = {role: prompt_ids(m, prompt) for role, m in self.m.items()}
        beams, first = [[]], True
        while len(beams[0]) < self.decode.max_new_tokens:
            children = [list(b) for b in beams for _ in range(W * K if first else K)]
            n = min(L, self.decode.max_new_tokens - len(children[0]))
            children = [c + t for c, t in zip(children, self.sample_chunk(heads, children, n))]
            scores = self.score(heads["explicit"], children)
            beams = [children[i] for i in sorted(range(len(children)), key=lambda i: -scores[i])[:W]]
            first = False
        return beams[0]

    def sample_chunk(self, heads, children, n) -> list[list[int]]:
        base = self.m["base"]
        ids, mask = left_pad([heads["base"] + c for c in children], pad_id(base.tokenizer), base.device)
        guide = NaiveImplicitGuidance(self.m["tuned"], self.m["untuned"], [heads["tuned"] + c for c in children],
                                      self.method.beta_token)
        out = base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=True, temperature=self.decode.temperature, top_k=0, top_p=1.0,
                                  logits_processor=LogitsProcessorList([guide]), pad_token_id=pad_id(base.tokenizer))
        self.tokens += int(mask.sum()) + (n - 1) * len(children) + guide.tokens  # base: prefill, then n - 1 steps
        return out[:, ids.shape[1]:].tolist()

    def score(self, head, children) -> list[float]:
        m = self.m["explicit"]
        ids, mask = left_pad([head + c for c in children], pad_id(m.tokenizer), m.device)
        q = lm_call(m.model, ids, mask, None, keep=2).logits[:, 0]  # (B, V): Q(s_{n-1}, .)
        self.tokens += int(mask.sum())
        return (self.method.beta_chunk * q.gather(-1, ids[:, -1:]).squeeze(-1)).tolist()


# ---------------------------------------------------------------- measuring

def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def timed(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def load_engine(config: GenerationConfig) -> tuple[Engine, dict]:
    """The in-process engine, loading role by role to record the RSS each role's models add."""
    tokenizer = load_tokenizer(config.models.base)
    rss = {"process_before_models": rss_mb()}
    roles = {}
    for name in needed_roles(config):
        before = rss_mb()
        roles[name] = load_role(name, config, tokenizer)
        # weights are what a role needs wherever it runs; RSS undercounts memory-mapped safetensors
        rss[f"{name}_weights"] = sum(t.numel() * t.element_size() for m in roles[name].models
                                     for t in [*m.model.parameters(), *m.model.buffers()]) / 2**20
        rss[f"{name}_rss_added"] = rss_mb() - before
    return Engine.from_roles(config, roles), rss


def with_tokens(engine: Engine, n: int) -> Engine:
    """The same engine (same loaded roles) decoding n new tokens."""
    config = engine.config
    config = dataclasses.replace(config, decode=dataclasses.replace(config.decode, max_new_tokens=n))
    return Engine(config, engine.roles, engine.tokenizer, engine.stopper.eos_ids)


def role_models(engine: Engine) -> dict[str, LoadedModel]:
    roles = engine.roles.roles
    return {"base": roles["base"].models[0], "tuned": roles["implicit"].models[0],
            "untuned": roles["implicit"].models[1], "explicit": roles["explicit"].models[0]}


def measure_family(family: str, work: Workload, device: str, threads: int, log) -> dict:
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS, temperature=0.7, stop=(), stop_at_eos=False)
    config = GenerationConfig(family_models(family, device), decode, (METHOD,), seed=0)
    engine, rss = load_engine(config)
    timer = ForwardTimer()
    timer.instrument(engine.roles.roles)
    rows = bench_rows(work.prompts)
    naive = NaiveIVG(role_models(engine), METHOD, decode)
    # warm-up, one chunk each: first-call allocations and lazy initialisation
    with_tokens(engine, METHOD.L).run(rows[:1], METHOD)
    NaiveIVG(naive.m, METHOD, with_tokens(engine, METHOD.L).config.decode).run(rows[0]["prompt"])

    # 1-2. speedup and forward fraction; engine and naive alternate so both see the same machine load
    engine_s, naive_s, fractions, outputs = [], [], [], []
    for r in range(work.repeats):
        timer.reset()
        engine_s.append(timed(lambda: outputs.extend(engine.run(rows, METHOD))))
        fractions.append(timer.seconds / engine_s[-1])
        torch.manual_seed(r)
        naive.tokens = 0
        naive_s.append(timed(lambda: [naive.run(row["prompt"]) for row in rows[:work.naive_prompts]]))
        log(f"[bench] {family} repeat {r}: engine {engine_s[-1]:.2f}s / {work.prompts} prompts, "
            f"naive {naive_s[-1]:.2f}s / {work.naive_prompts}, forward fraction {fractions[-1]:.2f}")
    engine_pps = work.prompts / statistics.median(engine_s)
    naive_pps = work.naive_prompts / statistics.median(naive_s)
    # model tokens per prompt (all four models): the speedup a purely compute-bound device could show
    engine_tokens = sum(sum(o["model_tokens"].values()) for o in outputs[-len(rows):]) / len(rows)
    naive_tokens = naive.tokens / work.naive_prompts
    out = {"engine_prompts_per_s": engine_pps, "naive_prompts_per_s": naive_pps,
           "speedup_vs_naive": engine_pps / naive_pps, "forward_fraction": statistics.median(fractions),
           "naive_over_engine_tokens": naive_tokens / engine_tokens,
           "engine_s": engine_s, "naive_s": naive_s}

    out["speedup_vs_reference"] = None
    if work.reference_prompts:  # the test oracle: no caches at all, so a far slower yardstick
        models, eos = role_models(engine), engine.stopper.eos_ids
        seconds = timed(lambda: [naive_search(models, row["id"], row["prompt"], METHOD, decode, eos, 0)
                                 for row in rows[:work.reference_prompts]])
        out["speedup_vs_reference"] = engine_pps / (work.reference_prompts / seconds)

    # 3. chunk-scoring growth over 20 chunks: one explicit `chunk` call per chunk, all rows batched
    out["chunk_scoring_ratio"] = None
    if work.chunk_prompts:
        long = with_tokens(engine, SCORED_CHUNKS * METHOD.L)
        calls = record_calls(engine.roles.roles["explicit"], "chunk")
        firsts, lasts = [], []
        for _ in range(work.repeats):
            calls.clear()
            long.run(bench_rows(work.chunk_prompts), METHOD)
            assert len(calls) == SCORED_CHUNKS, f"{len(calls)} chunk calls, expected {SCORED_CHUNKS}"
            firsts.append(calls[0])
            lasts.append(calls[-1])
        out["chunk_scoring_ratio"] = statistics.median(lasts) / statistics.median(firsts)
        out["chunk_scoring_s"] = {"first": firsts, "last": lasts}
        del engine.roles.roles["explicit"].chunk  # back to the class's method

    # 5a. throughput against prompts per batch
    out["batch_scaling"] = None
    if work.batch_sizes:
        many = bench_rows(max(work.batch_sizes))
        out["batch_scaling"] = {str(b): b / statistics.median([timed(lambda: engine.run(many[:b], METHOD))
                                                               for _ in range(work.repeats)])
                                for b in work.batch_sizes}
    rss["process_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out["peak_rss_mb"] = rss

    # 4, 5b. the Ray pipeline over the same prompts
    out["pipeline_vs_engine"], out["actor_scaling"] = None, None
    if work.pipeline:
        pipe = measure_pipeline(config, rows, work.repeats, threads, lambda: engine.run(rows, METHOD), log)
        out["pipeline_vs_engine"] = pipe["one_shard_s"] / pipe["engine_s"]
        out["actor_scaling"] = pipe["actor_scaling"]
        out["pipeline"] = pipe
    return out


def sized(cfg, prompts: int):
    """What preflight would find for `prompts` input rows (the bench's runs write to temp folders and
    need no other check): the Scheduler's totals."""
    from pipeline.coordinator import Checked

    return Checked(prompts, -(-prompts // cfg.pipeline.shard_size), fresh=True, capacity=True)


def measure_pipeline(config: GenerationConfig, rows: list[dict], repeats: int, threads: int, run_engine,
                     log) -> dict:
    """The pipeline on this node: colocated model server, search actors. Its steady state is timed
    (clusters started and warmed first), like the engine's, whose models are loaded before timing;
    the engine runs alternate with the pipeline's, so both see the same machine load."""
    import ray

    from pipeline.config import Config
    from pipeline.coordinator import Scheduler, start_cluster, stop_cluster
    from pipeline.io import Manifest
    from ivg.config import from_dict

    tmp = Path(tempfile.mkdtemp(prefix="ivg-bench-"))
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def pipeline_config(actors: int, shard_size: int) -> Config:
        return from_dict(Config, {
            "models": config.models, "decode": config.decode, "methods": config.methods,
            "run": {"seed": config.seed}, "data": {"path": str(prompts)},
            "pipeline": {"placement": "colocated", "search_actors": actors, "search_cpus": 0.25,
                         "shard_size": shard_size, "batch_window_ms": 2.0,
                         "servers": {"colocated": {"num_cpus": 0.5, "torch_threads": threads}}}})

    def run_once(cfg: Config, cluster) -> float:
        """One pass of the coordinator's loop over every shard, on an already started cluster."""
        out = Path(tempfile.mkdtemp(dir=tmp))
        (out / "shards").mkdir()
        manifest = Manifest.open(out / "manifest.json", cfg.resolved(), cfg.fingerprint())
        scheduler = Scheduler(cfg, manifest, out, log=lambda *a, **k: None, checked=sized(cfg, len(rows)))
        scheduler.cluster = cluster
        return timed(scheduler.run)

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False,
             log_to_driver=False)
    try:
        # one cluster with 2 search actors; a run configured for 1 submits only to the first
        start = time.perf_counter()
        cluster = start_cluster(pipeline_config(2, len(rows)))
        result = {"startup_s": time.perf_counter() - start, "actor_scaling": {}}
        try:
            run_once(pipeline_config(1, len(rows)), cluster)  # warm-up
            # overhead: exactly the engine's batch (one shard of every prompt, one search actor)
            pairs = [(timed(run_engine), run_once(pipeline_config(1, len(rows)), cluster)) for _ in range(repeats)]
            result["engine_s"] = statistics.median(e for e, _ in pairs)
            result["one_shard_s"] = statistics.median(p for _, p in pairs)
            for actors in (1, 2):  # two shards, served by one search actor or two
                cfg = pipeline_config(actors, max(len(rows) // 2, 1))
                seconds = statistics.median([run_once(cfg, cluster) for _ in range(repeats)])
                result["actor_scaling"][str(actors)] = len(rows) / seconds
                log(f"[bench] pipeline, {actors} search actor(s): {len(rows) / seconds:.2f} prompts/s")
        finally:
            stop_cluster(cluster)
    finally:
        ray.shutdown()
    return result


# ---------------------------------------------------------------- suite cluster: a multi-node cluster on loopback

CLUSTER_PROMPTS, CLUSTER_SHARD = 32, 2  # 16 shards: 4 search actors stay busy, each timing is seconds


def cluster_nodes():
    """cluster.yaml's node types with room for 2 replicas of every role (fake GPUs) and 4 search
    actors: b0 holds the base servers, g0 and g1 the guide servers and the search actors."""
    from pipeline.loopback import NodeSpec

    return [NodeSpec("h", 0), NodeSpec("b0", 2, 2, {"base_gpu": 2}),
            NodeSpec("g0", 4, 2, {"guide_gpu": 2}), NodeSpec("g1", 4, 2, {"guide_gpu": 2})]


def endpoint_nodes(cluster) -> dict:
    """(ip, port) of every TCP socket of the cluster's processes -> the node it belongs to (this
    driver belongs to the head, whose raylet it talks to)."""
    from pipeline.loopback import processes_of

    owners = {os.getpid(): "h"}
    for node in cluster.nodes:
        owners.update({p.pid: node.name for p in processes_of(node.temp_dir)})
    ends = {}
    for pid, node in owners.items():
        try:
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.laddr:
                    ends[(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)] = node
        except psutil.Error:
            pass
    return ends


def tcp_received() -> dict:
    """(local, peer) -> bytes received on that TCP socket, from the kernel's tcp_info (`ss -tin`)."""
    import re
    import subprocess

    out = subprocess.run(["ss", "-tinH"], capture_output=True, text=True, check=True).stdout.splitlines()
    endpoint = lambda text: (text.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:"),  # noqa: E731
                             int(text.rsplit(":", 1)[1]))
    found, key = {}, None
    for line in out:  # a socket's line, then (indented) its tcp_info
        if not line[:1].isspace():
            parts = line.split()
            key = (endpoint(parts[3]), endpoint(parts[4])) if len(parts) >= 5 else None
        elif key and (got := re.search(r"bytes_received:(\d+)", line)):
            found[key] = int(got.group(1))
    return found


def between_nodes(before: dict, after: dict, ends: dict) -> dict[str, int]:
    """Bytes received over sockets whose two ends are on different nodes, between two snapshots, by
    "sender->receiver" node pair (each byte counted once, where it arrived; a socket closed in
    between is missed: Ray's connections are long-lived)."""
    moved = Counter()
    for (local, peer), n in after.items():
        if local in ends and peer in ends and ends[local] != ends[peer]:
            moved[f"{ends[peer]}->{ends[local]}"] += n - before.get((local, peer), 0)
    return dict(moved)


def actor_nodes(loopback, cluster) -> dict[str, str]:
    """Which node each actor of `cluster` runs on (Ray's state API)."""
    handles = {f"{name}[{i}]": h for name, hs in cluster.servers.items() for i, h in enumerate(hs)}
    handles.update({f"search-{k}": h for k, h in enumerate(cluster.searchers)})
    return {name: getattr(loopback.node_of(h._actor_id.hex()), "name", None) for name, h in handles.items()}


def measure_cluster(threads: int, log) -> dict:
    """The Ray pipeline across 4 raylets on this machine (pipeline/loopback.py), placement separate
    (base, implicit, explicit servers on their own nodes by cluster.yaml's resources): prompts/s
    against model-server replicas (1, 2) and search actors (1, 2, 4), and the bytes that cross
    between nodes per token step. Each cluster is started and warmed before it is timed."""
    import ray

    from ivg.config import from_dict
    from pipeline.config import Config
    from pipeline.coordinator import Cluster, Scheduler, server_stats, start_cluster, stop_cluster
    from pipeline.io import Manifest
    from pipeline.loopback import LoopbackCluster

    tmp = Path(tempfile.mkdtemp(prefix="ivg-bench-"))
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in bench_rows(CLUSTER_PROMPTS)))
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS, temperature=0.7, stop=(), stop_at_eos=False)

    def config(replicas: int, actors: int) -> Config:
        role = lambda resource: {"num_cpus": 1, "num_gpus": 1, "resources": {resource: 1},  # noqa: E731
                                 "replicas": replicas, "torch_threads": threads}
        return from_dict(Config, {
            "models": family_models("tiny", "cpu"), "decode": decode, "methods": (METHOD,),
            "data": {"path": str(prompts)},
            "pipeline": {"placement": "separate", "search_actors": actors, "search_cpus": 1,
                         "shard_size": CLUSTER_SHARD, "batch_window_ms": 2.0,
                         "servers": {"base": role("base_gpu"), "implicit": role("guide_gpu"),
                                     "explicit": role("guide_gpu")}}})

    def timed_run(cfg: Config, cluster: Cluster) -> tuple[float, Scheduler]:
        out = Path(tempfile.mkdtemp(dir=tmp))
        (out / "shards").mkdir()
        scheduler = Scheduler(cfg, Manifest.open(out / "manifest.json", cfg.resolved(), cfg.fingerprint()), out,
                              log=lambda *a, **k: None, checked=sized(cfg, CLUSTER_PROMPTS))
        scheduler.cluster = cluster
        seconds = timed(scheduler.run)
        assert scheduler.counts["done"] == CLUSTER_PROMPTS // CLUSTER_SHARD, scheduler.counts
        return seconds, scheduler

    result = {"prompts_per_s": {}, "bytes_between_nodes_per_token_step": {}, "bytes_by_node_pair": {},
              "token_steps": {}, "placement": {}, "startup_s": {}}
    start = time.perf_counter()
    with LoopbackCluster(cluster_nodes()) as loopback:
        result["cluster_start_s"] = time.perf_counter() - start
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=loopback.address, log_to_driver=False)
        try:
            for replicas, counts in ((1, (1, 2, 4)), (2, (2, 4))):
                start = time.perf_counter()
                full = start_cluster(config(replicas, 4))
                result["startup_s"][str(replicas)] = time.perf_counter() - start
                try:
                    timed_run(config(replicas, 4), full)  # warm-up: first calls, lazy initialisation
                    for actors in counts:
                        cluster = dataclasses.replace(full, searchers=full.searchers[:actors])
                        steps_before = sum(s.get("next_requests", 0) for name, s in server_stats(full).items()
                                           if name.startswith("base"))
                        ends, before = endpoint_nodes(loopback), tcp_received()
                        seconds, _ = timed_run(config(replicas, actors), cluster)
                        pairs = between_nodes(before, tcp_received(), {**ends, **endpoint_nodes(loopback)})
                        steps = sum(s.get("next_requests", 0) for name, s in server_stats(full).items()
                                    if name.startswith("base")) - steps_before
                        key = f"replicas={replicas},actors={actors}"
                        result["prompts_per_s"][key] = CLUSTER_PROMPTS / seconds
                        result["bytes_between_nodes_per_token_step"][key] = sum(pairs.values()) / max(steps, 1)
                        result["bytes_by_node_pair"][key] = pairs
                        result["token_steps"][key] = steps
                        log(f"[bench] cluster {key}: {CLUSTER_PROMPTS / seconds:.2f} prompts/s, "
                            f"{sum(pairs.values()) / max(steps, 1):.0f} bytes between nodes per token step "
                            f"({steps} steps; {pairs})")
                    result["placement"][str(replicas)] = actor_nodes(loopback, full)
                finally:
                    stop_cluster(full)
        finally:
            ray.shutdown()
    pps = result["prompts_per_s"]
    result["replica_scaling"] = {a: pps[f"replicas=2,actors={a}"] / pps[f"replicas=1,actors={a}"] for a in ("2", "4")}
    result["actor_scaling"] = {a: pps[f"replicas=1,actors={a}"] / pps["replicas=1,actors=1"] for a in ("2", "4")}
    result["rows_per_token_step"] = CLUSTER_SHARD * METHOD.W * METHOD.K
    return result


def cluster_markdown(r: dict) -> str:
    lines = ["| model-server replicas | search actors | prompts/s | bytes between nodes per token step |",
             "|---|---|---|---|"]
    for key, pps in r["prompts_per_s"].items():
        replicas, actors = (part.split("=")[1] for part in key.split(","))
        lines.append(f"| {replicas} | {actors} | {pps:.2f} | {r['bytes_between_nodes_per_token_step'][key]:.0f} |")
    return "\n".join(lines)


def run_cluster_suite(threads: int, log=print) -> dict:
    torch.set_num_threads(threads)
    report = {"suite": "cluster", "command": " ".join(["python -m jobs.bench"] + sys.argv[1:]),
              "machine": machine("cpu", threads), "versions": versions(), "git": git_revision()}
    results = measure_cluster(threads, log)
    report["settings"] = {
        "method": dataclasses.asdict(METHOD), "new_tokens": NEW_TOKENS, "models": "tiny (random, float32)",
        "prompts": CLUSTER_PROMPTS, "shard_size": CLUSTER_SHARD,
        "cluster": "pipeline/loopback.py: a head (no CPUs) and 3 worker raylets on 127.0.0.1 with cluster.yaml's "
                   "resources, fake GPUs: b0 {base_gpu: 2}, g0 and g1 {guide_gpu: 2}; placement separate",
        "bytes": "TCP bytes received on sockets joining processes of different nodes (kernel tcp_info via `ss`), "
                 "during the timed run, over the base servers' `next` calls (one per token step of a search)",
    }
    report["results"] = results
    report["markdown"] = cluster_markdown(results)
    return report


# ---------------------------------------------------------------- report

def machine(device: str, threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "torch_threads": threads,
            "device": device, "load_average_at_start": list(os.getloadavg())}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def headline(by_model: dict) -> tuple[dict, dict]:
    """Each key from the most realistic family that measured it (the last in the suite)."""
    keys = ["speedup_vs_naive", "naive_over_engine_tokens", "speedup_vs_reference", "forward_fraction",
            "chunk_scoring_ratio", "pipeline_vs_engine", "batch_scaling", "actor_scaling", "peak_rss_mb"]
    results, source = {}, {}
    for key in keys:
        family = next((f for f in reversed(list(by_model)) if by_model[f].get(key) is not None), None)
        results[key] = by_model[family][key] if family else None
        source[key] = family
    return results, source


def markdown(report: dict) -> str:
    by_model = report["results"]["by_model"]
    families = list(by_model)
    fmt = lambda v: "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else
                                           ", ".join(f"{k}: {x:.1f}" for k, x in v.items()))
    lines = [f"| metric | {' | '.join(families)} | target | met |", "|---" * (len(families) + 3) + "|"]
    for key in ["speedup_vs_naive", "naive_over_engine_tokens", "speedup_vs_reference", "forward_fraction",
                "chunk_scoring_ratio", "pipeline_vs_engine", "batch_scaling", "actor_scaling"]:
        target = report["targets"].get(key)
        met = report["met"].get(key)
        lines.append(f"| {key} | {' | '.join(fmt(by_model[f].get(key)) for f in families)} | "
                     f"{' '.join(map(str, target)) if target else ''} | "
                     f"{'' if key not in report['met'] else {True: 'yes', False: 'NO', None: '—'}[met]} |")
    rss = lambda f: ", ".join(f"{k}: {v:.0f}" for k, v in by_model[f]["peak_rss_mb"].items())
    lines.append(f"| peak_rss_mb | {' | '.join(rss(f) for f in families)} |  |  |")
    return "\n".join(lines)


def run_suite(suite: str, device: str, threads: int, log=print) -> dict:
    torch.set_num_threads(threads)
    report = {"suite": suite, "command": " ".join(["python -m jobs.bench"] + sys.argv[1:]),
              "machine": machine(device, threads), "versions": versions(), "git": git_revision()}
    by_model = {}
    for family, work in SUITES[suite].items():
        start = time.perf_counter()
        by_model[family] = measure_family(family, work, device, threads, log)
        log(f"[bench] {family} done in {time.perf_counter() - start:.0f}s")
    results, source = headline(by_model)
    reasons = {k: ("not run in this suite (no Ray)" if k in ("pipeline_vs_engine", "actor_scaling") else
                   "not run in this suite") for k, v in results.items() if v is None}
    report["settings"] = {
        "method": dataclasses.asdict(METHOD), "new_tokens": NEW_TOKENS, "temperature": 0.7,
        "stop": "none: fixed-length decoding (no stop strings, no EOS) on both sides",
        "chunk_scoring": f"{SCORED_CHUNKS} chunks of L={METHOD.L} ({SCORED_CHUNKS * METHOD.L} new tokens)",
        "models": {f: dataclasses.asdict(family_models(f, device)) for f in by_model},
        "stand_ins": "smollm2-135m: SmolLM2-135M-Instruct is base, tuned and untuned (two copies) and the "
                     "explicit value loaded as a token reward model (kind token_reward): real forward costs, "
                     "meaningless guidance",
        "naive": "jobs/bench.py NaiveIVG: per prompt, HF generate per chunk over W*K rows (KV cache only within "
                 "the call, guides in a logits processor), scorer re-encodes whole prefixes each chunk",
        "workloads": {f: dataclasses.asdict(w) for f, w in SUITES[suite].items()},
        "pipeline": "colocated model server, batch_window_ms 2; steady state after warm-up",
    }
    report["results"] = {**results, "measured_on": source, "by_model": by_model, "reason": reasons}
    report["targets"] = {k: list(v) for k, v in TARGETS.items()}
    report["met"] = {k: None if results[k] is None else (results[k] >= t if op == ">=" else results[k] <= t)
                     for k, (op, t) in TARGETS.items()}
    report["markdown"] = markdown(report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES) + ["cluster"], default="quick",
                   help="cluster: the pipeline on a loopback multi-node cluster (< 6 min)")
    p.add_argument("--out", default="bench.json", help="where the JSON report goes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    # 1 by default: on a shared box (CI), more threads than free cores makes OpenMP spin and one
    # SmolLM2 decode step 10x slower (measured here); raise it on a quiet machine
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    report = (run_cluster_suite(args.threads) if args.suite == "cluster" else
              run_suite(args.suite, args.device, args.threads))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n`{report['command']}` ({report['machine']['cpu']}, {args.device}):\n\n{report['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
