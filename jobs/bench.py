"""Benchmarks behind "same method, much faster": `python -m jobs.bench --suite quick --out bench.json`.

One process measures, per model family (tiny random models; SmolLM2-135M-Instruct), medians over repeats:

  cells                per grid cell (plain, EFT, CBS-implicit, CBS-explicit, IVG at W,K,L = 4,4,5):
                       engine prompts/s against a fair research-code baseline (NaiveIVG below)
  speedup_vs_naive     the IVG cell's (token-wise implicit + chunk-level explicit) engine / NaiveIVG
  forward_fraction     share of the engine's IVG decode wall time spent inside model forwards
  chunk_scoring_ratio  time of the 20th chunk-scoring call over the 1st (100 new tokens)
  pipeline_vs_engine   the Ray pipeline's wall time over the in-process engine's, same prompts, placement
                       colocated (and `pipeline_vs_engine_separate`: a server actor per role)
  search_bytes_per_row_step  bytes the search actor receives per row per token step (separate placement),
                       and `server_bytes_per_row_step`, the value vectors sent server to server
  batch_scaling        engine prompts/s at 1, 4, 16, 64 prompts per batch
  actor_scaling        colocated pipeline prompts/s, 2 shards with 1 and 2 search slots on the server
  colocated_batching   2 shards on one process: as one larger batch, as merged steps of 2 concurrent
                       searches, one after the other (prompts/s)
  peak_rss_mb          RSS each role's models add when loaded, and the process's peak

Decoding runs a fixed length (no stop strings, no EOS) so both sides sample exactly the same number
of tokens. SmolLM2 stands in for every role (two copies as tuned/untuned, one loaded as a token
reward model): the guidance is meaningless but every forward has the real cost. The JSON records
machine, versions, models and settings; a Markdown table is printed at the end.
Suites: smoke (tiny only, < 1 min, for tests), quick (<= 6 min on 2 idle CPU cores), full; and cluster:
the pipeline on a multi-node cluster on this machine, prompts/s against model-server replicas and
search actors, and the bytes that cross between nodes per token step (< 6 min).
On a GPU machine: `--device cuda`. Where the time goes: `--profile CELL --family F` (torch.profiler).
"""

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from ivg.cache import cache_kwargs, returned_cache
from ivg.config import DecodeConfig, GenerationConfig, MethodConfig, Models, ModelSpec
from ivg.engine import Engine, load_role, needed_roles
from ivg.models import LoadedModel, load_tokenizer, pad_id, prompt_ids
from ivg.provenance import git_revision, versions
from ivg.profiling import ForwardTimer, record_calls, synchronize
from ivg.reference import naive_search

METHOD = MethodConfig(token="implicit", chunk="explicit", W=4, K=4, L=5, name="ivg")
CELLS = {  # the grid cells of the per-cell table, at the paper's IMDB search shape
    "plain": MethodConfig(name="plain"),
    "eft": MethodConfig(token="implicit", name="eft"),
    "cbs-implicit": MethodConfig(chunk="implicit", W=4, K=4, L=5, name="cbs-implicit"),
    "cbs-explicit": MethodConfig(chunk="explicit", W=4, K=4, L=5, name="cbs-explicit"),
    "ivg": METHOD,
}
NEW_TOKENS = 48
SCORED_CHUNKS = 20  # chunk_scoring_ratio compares chunk 20 with chunk 1
TARGETS = {  # per family (issues #10 and #15); `targets` in the report: those of the family measuring a key
    "tiny": {"speedup_vs_naive": (">=", 10.0), "forward_fraction": (">=", 0.9), "chunk_scoring_ratio": ("<=", 1.15),
             "pipeline_vs_engine": ("<=", 1.05)},
    "smollm2-135m": {"speedup_vs_naive": (">=", 8.0), "forward_fraction": (">=", 0.97),
                     "chunk_scoring_ratio": ("<=", 1.15), "pipeline_vs_engine": ("<=", 1.05),
                     "pipeline_vs_engine_separate": ("<=", 1.30), "search_bytes_per_row_step": ("<=", 64.0)},
}
HEADLINE = ("speedup_vs_naive", "forward_fraction", "chunk_scoring_ratio", "pipeline_vs_engine")
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
    pipeline: tuple[str, ...] = ()  # placements of the Ray pipeline to time against the engine
    cells: tuple[str, ...] = ("ivg",)  # grid cells timed against NaiveIVG (the IVG cell always)
    colocated_batching: bool = False  # one larger batch vs merged steps, in process
    actor_scaling: bool = False  # colocated pipeline: 2 shards with 1 and 2 search slots
    scaling_repeats: int = 1  # of batch_scaling, colocated_batching, chunk scoring


SUITES = {
    "smoke": {"tiny": Workload(4, 2, 0, 1, (1, 4), 2)},
    "quick": {"tiny": Workload(16, 4, 1, 3, (1, 4, 16, 64), 16, ("colocated", "separate"), tuple(CELLS), True, True,
                               3),
              "smollm2-135m": Workload(2, 1, 0, 1, (), 1, ("colocated", "separate"), scaling_repeats=3)},
    "full": {"tiny": Workload(16, 16, 2, 5, (1, 4, 16, 64), 16, ("colocated", "separate"), tuple(CELLS), True, True,
                              5),
             "smollm2-135m": Workload(16, 4, 0, 3, (1, 4, 16), 4, ("colocated", "separate"), tuple(CELLS), False,
                                      True, 3)},
}


def family_models(family: str, device: str, dtype: str = "auto") -> Models:
    """The roles' models; `dtype` as given, except that the tiny family (a probe of overheads, not of
    arithmetic) stays in float32 unless a dtype is named, as issue #15 measured it."""
    if family == "tiny":
        dtype = "float32" if dtype == "auto" else dtype
        spec = lambda name, kind="causal_lm": ModelSpec(name, kind=kind, device=device, dtype=dtype)
        return Models(base=spec("tiny:base"), tuned=spec("tiny:tuned"), untuned=spec("tiny:untuned"),
                      explicit=spec("tiny:trm", "token_reward"))
    spec = lambda kind="causal_lm": ModelSpec("asset:smollm2-135m-instruct", kind=kind, device=device, dtype=dtype)
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
            state.append((returned_cache(out), mask))
        self.state = state
        return scores + self.beta * (logps[0] - logps[1])


def lm_call(model, ids, mask, cache, keep):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    use_cache = cache is not None or keep == 1  # a scorer keeps no cache; generate's guides do
    kwargs = cache_kwargs(model, cache if cache is not None else DynamicCache()) if use_cache else {}
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache,
                 logits_to_keep=keep, **kwargs)


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


class NaiveIVG:
    """A grid cell the way the weak-to-strong-search / CBS scripts run it: one prompt at a time; each
    chunk sampled by HF `generate` over that prompt's W*K rows (a fresh KV cache per call, so every
    chunk re-encodes the whole prefix; token-wise implicit guidance in a logits processor); then the
    chunk-level scorer re-encodes every whole prefix. Fair to it: a scorer computes only the logits it
    reads, and there are no stop strings to check. Supports the cells of CELLS (token-wise none or
    implicit, chunk-level none, implicit or explicit)."""

    def __init__(self, models: dict[str, LoadedModel], method: MethodConfig, decode: DecodeConfig):
        if method.token == "explicit":
            raise ValueError("NaiveIVG implements token-wise none | implicit")
        self.m, self.method, self.decode = models, method, decode
        self.tokens = 0  # real (unpadded) tokens fed to all models, as the engine's model_tokens count them

    @torch.no_grad()
    def run(self, prompt: str) -> list[int]:
        W, K = self.method.W, self.method.K
        L = self.method.L or self.decode.max_new_tokens
        heads = {role: prompt_ids(m, prompt) for role, m in self.m.items()}
        beams, first = [[]], True
        while len(beams[0]) < self.decode.max_new_tokens:
            children = [list(b) for b in beams for _ in range(W * K if first else K)]
            n = min(L, self.decode.max_new_tokens - len(children[0]))
            children = [c + t for c, t in zip(children, self.sample_chunk(heads, children, n))]
            if self.method.chunk == "none":
                beams = children[:W]
            else:
                scores = self.score(heads, children)
                beams = [children[i] for i in sorted(range(len(children)), key=lambda i: -scores[i])[:W]]
            first = False
        return beams[0]

    def sample_chunk(self, heads, children, n) -> list[list[int]]:
        base = self.m["base"]
        ids, mask = left_pad([heads["base"] + c for c in children], pad_id(base.tokenizer), base.device)
        processors = LogitsProcessorList()
        if self.method.token == "implicit":
            guide = NaiveImplicitGuidance(self.m["tuned"], self.m["untuned"], [heads["tuned"] + c for c in children],
                                          self.method.beta_token)
            processors.append(guide)
        out = base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=True, temperature=self.decode.temperature, top_k=0, top_p=1.0,
                                  logits_processor=processors, pad_token_id=pad_id(base.tokenizer))
        self.tokens += int(mask.sum()) + (n - 1) * len(children)  # base: prefill, then n - 1 steps
        self.tokens += guide.tokens if self.method.token == "implicit" else 0
        return out[:, ids.shape[1]:].tolist()

    def score(self, heads, children) -> list[float]:
        if self.method.chunk == "explicit":  # Q(s_{n-1}, a_n) of a token reward model
            m = self.m["explicit"]
            ids, mask = left_pad([heads["explicit"] + c for c in children], pad_id(m.tokenizer), m.device)
            q = lm_call(m.model, ids, mask, None, keep=2).logits[:, 0]  # (B, V): Q(s_{n-1}, .)
            self.tokens += int(mask.sum())
            return (self.method.beta_chunk * q.gather(-1, ids[:, -1:]).squeeze(-1)).tolist()
        total = torch.zeros(len(children), dtype=torch.float64)  # implicit: sum of log pi_t - log pi_u
        n = len(children[0])
        for sign, m in ((1, self.m["tuned"]), (-1, self.m["untuned"])):
            ids, mask = left_pad([heads["tuned"] + c for c in children], pad_id(m.tokenizer), m.device)
            logp = torch.log_softmax(lm_call(m.model, ids, mask, None, keep=n + 1).logits[:, :-1].float(), -1)
            total += sign * logp.gather(-1, ids[:, -n:, None]).squeeze(-1).double().sum(-1)
            self.tokens += int(mask.sum())
        return (self.method.beta_chunk * total).tolist()


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


def measure_family(family: str, work: Workload, device: str, threads: int, log, dtype: str = "auto") -> dict:
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS, temperature=0.7, stop=(), stop_at_eos=False)
    config = GenerationConfig(family_models(family, device, dtype), decode, tuple(CELLS.values()), seed=0)
    engine, rss = load_engine(config)
    timer = ForwardTimer()
    timer.instrument(engine.roles.roles)
    rows = bench_rows(work.prompts)
    models = role_models(engine)
    # warm-up, one chunk each: first-call allocations and lazy initialisation
    with_tokens(engine, METHOD.L).run(rows[:1], METHOD)
    NaiveIVG(models, METHOD, with_tokens(engine, METHOD.L).config.decode).run(rows[0]["prompt"])

    # 1-2. per cell: engine vs naive, engine and naive alternating so both see the same machine load;
    # the IVG cell (the headline: speedup, forward fraction) with repeats
    out = {"cells": {}}
    outputs = []
    for name in dict.fromkeys(("ivg", *work.cells)):
        method = CELLS[name]
        naive = NaiveIVG(models, method, decode)
        engine_s, naive_s, fractions = [], [], []
        for r in range(work.repeats if name == "ivg" else 1):
            timer.reset()
            engine_s.append(timed(lambda: outputs.extend(engine.run(rows, method))))
            fractions.append(timer.seconds / engine_s[-1])
            torch.manual_seed(r)
            naive.tokens = 0
            naive_s.append(timed(lambda: [naive.run(row["prompt"]) for row in rows[:work.naive_prompts]]))
            log(f"[bench] {family} {name} repeat {r}: engine {engine_s[-1]:.2f}s / {work.prompts} prompts, "
                f"naive {naive_s[-1]:.2f}s / {work.naive_prompts}, forward fraction {fractions[-1]:.2f}")
        engine_pps = work.prompts / statistics.median(engine_s)
        naive_pps = work.naive_prompts / statistics.median(naive_s)
        # model tokens per prompt (all models): the speedup a purely compute-bound device could show
        engine_tokens = sum(sum(o["model_tokens"].values()) for o in outputs[-len(rows):]) / len(rows)
        out["cells"][name] = {"engine_prompts_per_s": engine_pps, "naive_prompts_per_s": naive_pps,
                              "speedup_vs_naive": engine_pps / naive_pps,
                              "forward_fraction": statistics.median(fractions),
                              "naive_over_engine_tokens": naive.tokens / work.naive_prompts / engine_tokens,
                              "engine_s": engine_s, "naive_s": naive_s}
    ivg = out["cells"]["ivg"]
    out.update({k: ivg[k] for k in ("speedup_vs_naive", "forward_fraction", "naive_over_engine_tokens")})
    out["engine_prompts_per_s"], out["naive_prompts_per_s"] = ivg["engine_prompts_per_s"], ivg["naive_prompts_per_s"]

    out["speedup_vs_reference"] = None
    if work.reference_prompts:  # the test oracle: no caches at all, so a far slower yardstick
        eos = engine.stopper.eos_ids
        seconds = timed(lambda: [naive_search(models, row["id"], row["prompt"], METHOD, decode, eos, 0)
                                 for row in rows[:work.reference_prompts]])
        out["speedup_vs_reference"] = ivg["engine_prompts_per_s"] / (work.reference_prompts / seconds)

    # 3. chunk-scoring growth over 20 chunks: one explicit Chunk per chunk, all rows batched. The
    # CBS-explicit cell makes the same Chunk calls as the IVG cell (same W,K,L) without the implicit
    # pair's forwards at every token, which would only make the run longer
    out["chunk_scoring_ratio"] = None
    if work.chunk_prompts:
        long, scored = with_tokens(engine, SCORED_CHUNKS * METHOD.L), CELLS["cbs-explicit"]
        assert (scored.W, scored.K, scored.L) == (METHOD.W, METHOD.K, METHOD.L)
        calls = record_calls(engine.roles.roles["explicit"], "chunk")
        firsts, lasts = [], []
        for _ in range(work.scaling_repeats):
            calls.clear()
            long.run(bench_rows(work.chunk_prompts), scored)
            assert len(calls) == SCORED_CHUNKS, f"{len(calls)} chunk calls, expected {SCORED_CHUNKS}"
            firsts.append(calls[0])
            lasts.append(calls[-1])
        out["chunk_scoring_ratio"] = statistics.median(lasts) / statistics.median(firsts)
        out["chunk_scoring_s"] = {"first": firsts, "last": lasts}
        del engine.roles.roles["explicit"].chunk  # back to the class's method

    # 4. throughput against prompts per batch
    out["batch_scaling"] = None
    if work.batch_sizes:
        many = bench_rows(max(work.batch_sizes))
        out["batch_scaling"] = {str(b): b / statistics.median([timed(lambda: engine.run(many[:b], METHOD))
                                                               for _ in range(work.scaling_repeats)])
                                for b in work.batch_sizes}

    # 5. two shards on one process: one larger batch, or the merged steps of two concurrent searches
    out["colocated_batching"] = None
    if work.colocated_batching:
        out["colocated_batching"] = measure_colocated_batching(config, rows, work.scaling_repeats, threads, engine)
        log(f"[bench] {family} colocated batching (prompts/s): {out['colocated_batching']}")
    out["dtypes"] = {name: str(next(role.models[0].model.parameters()).dtype).removeprefix("torch.")
                     for name, role in engine.roles.roles.items()}
    rss["process_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out["peak_rss_mb"] = rss

    # 6. the Ray pipeline over the same prompts
    for key in ("pipeline_vs_engine", "pipeline_vs_engine_separate", "search_bytes_per_row_step",
                "server_bytes_per_row_step", "actor_scaling"):
        out[key] = None
    if work.pipeline:
        pipe = measure_pipeline(config, rows, work.repeats, threads, lambda: engine.run(rows, METHOD),
                                work.pipeline, work.actor_scaling, log)
        out["pipeline"] = pipe
        for placement, p in pipe.items():
            suffix = "" if placement == "colocated" else f"_{placement}"
            out[f"pipeline_vs_engine{suffix}"] = p["one_shard_s"] / p["engine_s"]
        out["actor_scaling"] = pipe.get("colocated", {}).get("actor_scaling")
        if "separate" in pipe:
            out["search_bytes_per_row_step"] = pipe["separate"]["search"]["bytes_received_per_row_step"]
            out["server_bytes_per_row_step"] = pipe["separate"]["server_bytes_per_row_step"]
    return out


class ThreadRoles:
    """A roles client for a search running in its own thread, answered by a ModelServer on an event loop
    in another thread: concurrent searches' per-token messages meet in the server's batcher."""

    def __init__(self, server, loop, name: str):
        self.server, self.loop, self.name = server, loop, name
        self.open_sessions: set[str] = set()

    def call(self, messages: dict) -> dict:
        return asyncio.run_coroutine_threadsafe(self.server.call(messages, self.name), self.loop).result()

    def drop_open_sessions(self) -> None:
        self.server.drop(sorted(self.open_sessions))


def measure_colocated_batching(config: GenerationConfig, rows: list[dict], repeats: int, threads: int,
                               engine: Engine) -> dict:
    """Two shards (halves of `rows`) in one process, three ways: one larger batch (what a colocated
    server does), merged steps (two searches in threads, their token steps merged into one forward
    per model by a ModelServer's batcher, as separate placement does across search actors), and one
    after the other."""
    from pipeline.servers import ModelServer

    halves = [rows[:len(rows) // 2], rows[len(rows) // 2:]]
    server = ModelServer(config, needed_roles(config), batch_window_ms=20.0, torch_threads=threads)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engines = [Engine(config, ThreadRoles(server, loop, f"search-{k}"), engine.tokenizer, engine.stopper.eos_ids)
               for k in range(2)]

    def merged():
        workers = [threading.Thread(target=e.run, args=(h, METHOD)) for e, h in zip(engines, halves)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    try:
        merged()  # warm-up
        seconds = {"one_batch": [], "merged_steps": [], "sequential": []}
        for _ in range(repeats):
            seconds["one_batch"].append(timed(lambda: engine.run(rows, METHOD)))
            seconds["merged_steps"].append(timed(merged))
            seconds["sequential"].append(timed(lambda: [engine.run(h, METHOD) for h in halves]))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
    out = {k: len(rows) / statistics.median(v) for k, v in seconds.items()}
    out["merged_sessions_per_forward"] = dict(server.sessions_per_forward)
    return out


def sized(cfg, prompts: int):
    """What preflight would find for `prompts` input rows (the bench's runs write to temp folders and
    need no other check): the Scheduler's totals."""
    from pipeline.coordinator import Checked

    return Checked(prompts, -(-prompts // cfg.pipeline.shard_size), fresh=True, capacity=True)


def measure_pipeline(config: GenerationConfig, rows: list[dict], repeats: int, threads: int, run_engine,
                     placements: tuple[str, ...], actor_scaling: bool, log) -> dict:
    """The pipeline on this node, per placement: colocated (one model server that runs the searches) or
    separate (a server actor per role, one search actor). Its steady state is timed (clusters started
    and warmed first), like the engine's, whose models are loaded before timing; the engine runs
    alternate with the pipeline's, so both see the same machine load."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private embedded cluster: no token to write to ~/.ray
    from pipeline.config import Config
    from pipeline.coordinator import Checked, Scheduler, start_cluster, stop_cluster
    from pipeline.io import Manifest
    from ivg.config import from_dict

    tmp = Path(tempfile.mkdtemp(prefix="ivg-bench-"))
    prompts, warm = tmp / "prompts.jsonl", tmp / "warm.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    warm.write_text(json.dumps(rows[0]) + "\n")  # one prompt warms a cluster up (first-call costs)
    ivg_only = dataclasses.replace(config, methods=(METHOD,))

    def pipeline_config(placement: str, actors: int, shard_size: int, path: Path = prompts) -> Config:
        server = {"num_cpus": 0.4, "torch_threads": threads}
        return from_dict(Config, {
            "models": ivg_only.models, "decode": ivg_only.decode, "methods": ivg_only.methods,
            "run": {"seed": config.seed}, "data": {"path": str(path)},
            "pipeline": {"placement": placement, "search_actors": actors, "search_cpus": 0.2,
                         "shard_size": shard_size, "batch_window_ms": 2.0,
                         "servers": {"colocated": server, "base": server, "implicit": server, "explicit": server}}})

    def run_once(cfg: Config, cluster) -> float:
        """One pass of the coordinator's loop over every shard, on an already started cluster."""
        out = Path(tempfile.mkdtemp(dir=tmp))
        (out / "shards").mkdir()
        manifest = Manifest.open(out / "manifest.json", cfg.resolved(), cfg.fingerprint())
        n = sum(1 for _ in open(cfg.data.path))
        scheduler = Scheduler(cfg, manifest, out, log=lambda *a, **k: None, checked=sized(cfg, n))
        scheduler.cluster = cluster
        finished = scheduler.finished  # writing a shard's file and the manifest, timed apart

        def timed_finished(*args):
            inside.append(args[1].seconds)  # ShardResult.seconds: the shard's run inside the server
            writes.append(timed(lambda: finished(*args)))
        scheduler.finished = timed_finished
        return timed(scheduler.run)

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False,
             log_to_driver=False)
    results, writes, inside = {}, [], []
    try:
        for placement in placements:
            actors = 2 if placement == "colocated" else 1
            start = time.perf_counter()
            cluster = start_cluster(pipeline_config(placement, actors, len(rows)))
            result = {"startup_s": time.perf_counter() - start}
            try:
                run_once(pipeline_config(placement, 1, 1, warm), cluster)
                for s in cluster.servers.values():
                    ray.get([h.reset_stats.remote() for h in s])
                # overhead: exactly the engine's batch (one shard of every prompt, one search)
                writes.clear()
                inside.clear()
                pairs = [(timed(run_engine), run_once(pipeline_config(placement, 1, len(rows)), cluster))
                         for _ in range(repeats)]
                result["engine_s"] = statistics.median(e for e, _ in pairs)
                result["one_shard_s"] = statistics.median(p for _, p in pairs)
                result["write_s"] = statistics.median(writes)  # of one_shard_s: the shard's file and manifest
                result["server_s"] = statistics.median(inside)  # of one_shard_s: the search inside the server
                log(f"[bench] pipeline {placement}: {result['one_shard_s']:.2f}s vs engine {result['engine_s']:.2f}s")
                if placement == "separate":
                    search = ray.get(cluster.searchers[0].stats.remote())
                    servers = {name: ray.get(h[0].stats.remote()) for name, h in cluster.servers.items()}
                    value_bytes = sum(s.get("value_bytes_in", 0) for s in servers.values())
                    value_rows = sum(s.get("value_rows_in", 0) for s in servers.values())
                    result.update(search=search, servers=servers,
                                  server_bytes_per_row_step=value_bytes / max(value_rows, 1))
                elif actor_scaling:  # two shards on one server: one after the other (1 slot) or one batch (2)
                    result["actor_scaling"] = {}
                    for slots in (1, 2):
                        cfg = pipeline_config(placement, slots, max(len(rows) // 2, 1))
                        seconds = statistics.median([run_once(cfg, cluster) for _ in range(repeats)])
                        result["actor_scaling"][str(slots)] = len(rows) / seconds
                        log(f"[bench] pipeline colocated, {slots} search slot(s): {len(rows) / seconds:.2f} prompts/s")
            finally:
                stop_cluster(cluster)
            results[placement] = result
    finally:
        ray.shutdown()
    return results


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
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "cpu_bf16": sorted(set(flags) & {"avx512_bf16", "amx_bf16"}),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "torch_threads": threads,
            "device": device, "load_average_at_start": list(os.getloadavg())}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


KEYS = ["speedup_vs_naive", "naive_over_engine_tokens", "speedup_vs_reference", "forward_fraction",
        "chunk_scoring_ratio", "pipeline_vs_engine", "pipeline_vs_engine_separate", "search_bytes_per_row_step",
        "server_bytes_per_row_step", "batch_scaling", "actor_scaling", "colocated_batching", "peak_rss_mb"]


def headline(by_model: dict) -> tuple[dict, dict]:
    """Each key from the most realistic family that measured it (the last in the suite)."""
    results, source = {}, {}
    for key in KEYS:
        family = next((f for f in reversed(list(by_model)) if by_model[f].get(key) is not None), None)
        results[key] = by_model[family][key] if family else None
        source[key] = family
    return results, source


def met(value, target) -> bool | None:
    if value is None or target is None:
        return None
    op, t = target
    return value >= t if op == ">=" else value <= t


def markdown(report: dict) -> str:
    by_model = report["results"]["by_model"]
    families = list(by_model)
    fmt = lambda v: "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else
                                           ", ".join(f"{k}: {x:.1f}" for k, x in v.items() if isinstance(x, float)))
    targets = report["targets_by_model"]
    lines = [f"| metric | {' | '.join(families)} | target ({' / '.join(families)}) | met |",
             "|---" * 4 + "|"]
    for key in KEYS[:-1]:
        ts = [targets.get(f, {}).get(key) for f in families]
        verdicts = [met(by_model[f].get(key), t) for f, t in zip(families, ts)]
        lines.append(f"| {key} | {' | '.join(fmt(by_model[f].get(key)) for f in families)} | "
                     f"{' / '.join(' '.join(map(str, t)) if t else '—' for t in ts)} | "
                     f"{' / '.join({True: 'yes', False: 'NO', None: '—'}[v] for v in verdicts)} |")
    rss = lambda f: ", ".join(f"{k}: {v:.0f}" for k, v in by_model[f]["peak_rss_mb"].items())
    lines.append(f"| peak_rss_mb | {' | '.join(rss(f) for f in families)} |  |  |")
    cells = [(f, c) for f in families for c in by_model[f]["cells"]]
    lines += ["", "| family | cell | engine prompts/s | naive prompts/s | speedup | forward fraction | naive/engine tokens |",
              "|---|---|---|---|---|---|---|"]
    for f, c in cells:
        x = by_model[f]["cells"][c]
        lines.append(f"| {f} | {c} | {x['engine_prompts_per_s']:.2f} | {x['naive_prompts_per_s']:.2f} | "
                     f"{x['speedup_vs_naive']:.2f} | {x['forward_fraction']:.2f} | {x['naive_over_engine_tokens']:.2f} |")
    return "\n".join(lines)


def run_suite(suite: str, device: str, threads: int, log=print, dtype: str = "auto") -> dict:
    torch.set_num_threads(threads)
    report = {"suite": suite, "command": " ".join(["python -m jobs.bench"] + sys.argv[1:]),
              "machine": machine(device, threads), "versions": versions(), "git": git_revision()}
    by_model = {}
    for family, work in SUITES[suite].items():
        start = time.perf_counter()
        by_model[family] = measure_family(family, work, device, threads, log, dtype)
        by_model[family]["seconds"] = time.perf_counter() - start
        log(f"[bench] {family} done in {by_model[family]['seconds']:.0f}s")
    results, source = headline(by_model)
    pipeline_keys = ("pipeline_vs_engine", "pipeline_vs_engine_separate", "search_bytes_per_row_step",
                     "server_bytes_per_row_step", "actor_scaling")
    reasons = {k: ("not run in this suite (no Ray)" if k in pipeline_keys else "not run in this suite")
               for k, v in results.items() if v is None}
    report["settings"] = {
        "method": dataclasses.asdict(METHOD), "cells": {k: dataclasses.asdict(m) for k, m in CELLS.items()},
        "new_tokens": NEW_TOKENS, "temperature": 0.7,
        "stop": "none: fixed-length decoding (no stop strings, no EOS) on both sides",
        "chunk_scoring": f"{SCORED_CHUNKS} chunks of L={METHOD.L} ({SCORED_CHUNKS * METHOD.L} new tokens), cbs-explicit cell",
        "models": {f: dataclasses.asdict(family_models(f, device, dtype)) for f in by_model},
        "stand_ins": "smollm2-135m: SmolLM2-135M-Instruct is base, tuned and untuned (two copies) and the "
                     "explicit value loaded as a token reward model (kind token_reward): real forward costs, "
                     "meaningless guidance",
        "naive": "jobs/bench.py NaiveIVG: per prompt, HF generate per chunk over W*K rows (KV cache only within "
                 "the call, guides in a logits processor), scorer re-encodes whole prefixes each chunk",
        "workloads": {f: dataclasses.asdict(w) for f, w in SUITES[suite].items()},
        "pipeline": "colocated: one model server that runs the searches; separate: a server actor per role and "
                    "one search actor; batch_window_ms 2; steady state after warm-up",
    }
    report["results"] = {**results, "measured_on": source, "by_model": by_model, "reason": reasons}
    report["targets_by_model"] = {f: {k: list(v) for k, v in TARGETS[f].items()} for f in by_model}
    report["met_by_model"] = {f: {k: met(by_model[f].get(k), t) for k, t in TARGETS[f].items()} for f in by_model}
    report["targets"] = {k: list(TARGETS[source[k] or list(by_model)[-1]][k]) for k in HEADLINE}
    report["met"] = {k: met(results[k], report["targets"][k]) for k in HEADLINE}
    report["markdown"] = markdown(report)
    return report


def profile(family: str, cell: str, prompts: int, device: str, threads: int, dtype: str, rows: int = 30) -> str:
    """torch.profiler's table of one engine run of `cell`: where the time goes, by operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS, temperature=0.7, stop=(), stop_at_eos=False)
    config = GenerationConfig(family_models(family, device, dtype), decode, (CELLS[cell],), seed=0)
    engine, _ = load_engine(config)
    timer = ForwardTimer()
    timer.instrument(engine.roles.roles)
    with_tokens(engine, 5).run(bench_rows(1), CELLS[cell])  # warm-up
    timer.reset()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        seconds = timed(lambda: engine.run(bench_rows(prompts), CELLS[cell]))
    return (f"{family} {cell}, {prompts} prompts: {seconds:.2f}s, forward fraction {timer.seconds / seconds:.3f}\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES) + ["cluster"], default="quick",
                   help="cluster: the pipeline on a loopback multi-node cluster (< 6 min)")
    p.add_argument("--out", default="bench.json", help="where the JSON report goes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    # 1 by default: on a shared box (CI), more threads than free cores makes OpenMP spin and one
    # SmolLM2 decode step 10x slower (measured here); raise it on a quiet machine
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--dtype", default="auto", help="the models' dtype (auto, float32, bfloat16, ...)")
    p.add_argument("--profile", choices=sorted(CELLS), help="print a torch.profiler table of one engine run of CELL")
    p.add_argument("--family", default="tiny", choices=["tiny", "smollm2-135m"], help="with --profile")
    p.add_argument("--prompts", type=int, default=16, help="with --profile")
    args = p.parse_args(argv)
    if args.profile:
        print(profile(args.family, args.profile, args.prompts, args.device, args.threads, args.dtype))
        return 0
    report = (run_cluster_suite(args.threads) if args.suite == "cluster" else
              run_suite(args.suite, args.device, args.threads, dtype=args.dtype))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n`{report['command']}` ({report['machine']['cpu']}, {args.device}):\n\n{report['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
