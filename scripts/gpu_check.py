"""First contact with a GPU: the CUDA path correct, and the engine's throughput on big shapes.

    bash scripts/gpu_check.sh                 # on the GPU machine: everything, JSON under $OUT
    bash scripts/gpu_check.sh --cpu --tiny    # the same code paths on this CPU, tiny shapes (CI runs it)

Runs in-process (`PYTHONPATH=.`, no install, no Ray, no network), models built in memory:
  a. exactness: the engine equals the naive reference token for token in every grid cell (tiny models,
     float64, on the device), and the device's rows equal the CPU's for the same tiny models;
  b. throughput in bf16 of IVG (EFT token-wise + token-RM chunk-level) at W,K,L = 4,4,5 (48 tokens)
     and 2,2,30 (256 tokens), 32 and 128 prompts a batch: a Llama-3-8B-shaped base, SmolLM2-135M-shaped
     guides and token RM (random weights, the base's vocabulary so token-wise guidance applies);
     against plain batched HF `generate` of the same base over the same rows (W*K per prompt, the
     floor) and the naive per-prompt research-code baseline (jobs/bench.py NaiveIVG, on a few prompts);
     forward fraction; peak device memory;
  c. the engine-side keys of `python -m jobs.bench --suite smoke --device DEVICE`.
Every section writes its results (or its error) into one JSON; a section that fails does not stop
the others, and a time budget skips what would not fit.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from ivg.config import DecodeConfig, GenerationConfig, MethodConfig, Models, ModelSpec
from ivg.engine import Engine
from ivg.profiling import ForwardTimer, synchronize

CELLS = [(t, c) for t in ("none", "implicit", "explicit") for c in ("none", "implicit", "explicit")]
PROMPTS = ["the movie was", "a", "I loved this film so much that I", "Plot: two friends, one dog"]
OPENINGS = ["I went into this movie expecting very little, and", "The first thing you notice about this film is",
            "After twenty minutes I wanted to leave, but", "Honestly, the acting in this picture"]
SHAPES = {  # role -> random-weight architecture (ivg/tiny.py SHAPES); guides share the base's vocabulary
    "gpu": {"base": "shape:llama3-8b", "guide": "shape:smollm2-135m:v128256"},
    "tiny": {"base": "shape:mini", "guide": "shape:mini"},
}
RUNS = {  # (W, K, L, new tokens) -> prompts per batch
    "gpu": [((4, 4, 5, 48), (32, 128)), ((2, 2, 30, 256), (32, 128))],
    "tiny": [((4, 4, 5, 12), (2, 4)), ((2, 2, 6, 18), (2,))],
}


class Report:
    """Sections of results, written to the JSON after each one (a run killed at its limit keeps them)."""

    def __init__(self, path: Path, budget_s: float):
        self.path, self.deadline, self.data = path, time.monotonic() + budget_s, {"sections": {}}

    def section(self, name: str, fn, need_s: float = 0.0):
        if time.monotonic() + need_s > self.deadline:
            self.data["sections"][name] = {"status": "skipped: out of time"}
        else:
            start = time.perf_counter()
            try:
                self.data["sections"][name] = {"status": "ok", **fn()}
            except Exception as e:  # record it and go on: the other sections still say something
                self.data["sections"][name] = {"status": f"error: {type(e).__name__}: {e}",
                                               "traceback": traceback.format_exc()[-4000:]}
            self.data["sections"][name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"[gpu_check] {name}: {self.data['sections'][name]['status']}", flush=True)
        self.save()

    def save(self):
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def device_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}
    import transformers

    info["transformers"] = transformers.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


# ---------------------------------------------------------------- a. exactness

def tiny_models(device: str, dtype: str = "float64") -> Models:
    spec = lambda name, kind="causal_lm", **kw: ModelSpec(name, kind=kind, dtype=dtype, device=device, **kw)
    return Models(base=spec("tiny:base", template="Review: {prompt}"), tuned=spec("tiny:tuned"),
                  untuned=spec("tiny:untuned"), explicit=spec("tiny:trm", "token_reward"))


def cell(token: str, chunk: str) -> MethodConfig:
    return MethodConfig(token=token, chunk=chunk, **({} if chunk == "none" else {"W": 2, "K": 2, "L": 3}))


def exactness(device: str, n_prompts: int, cells=CELLS) -> dict:
    from ivg.reference import naive_search

    decode = DecodeConfig(max_new_tokens=10, temperature=0.8)
    methods = tuple(cell(t, c) for t, c in cells)
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS[:n_prompts])]
    engines = {d: Engine.local(GenerationConfig(tiny_models(d), decode, methods, seed=7)) for d in {"cpu", device}}
    on_device = engines[device]
    roles = on_device.roles.roles
    models = {"base": roles["base"].models[0], "tuned": roles["implicit"].models[0],
              "untuned": roles["implicit"].models[1], "explicit": roles["explicit"].models[0]}
    cells, cpu_equal, worst = {}, {}, 0.0
    for method in methods:
        got = on_device.run(rows, method)
        for g, r in zip(got, rows):
            tokens, text, score, _ = naive_search(models, r["id"], r["prompt"], method, decode,
                                                  on_device.stopper.eos_ids, 7)
            same = (g["status"], g["response"], g["n_new_tokens"]) == ("ok", text, len(tokens))
            cells[method.label] = cells.get(method.label, True) and same
            worst = max(worst, abs((g["score"] or 0.0) - score))
        if device != "cpu":
            cpu = engines["cpu"].run(rows, method)
            cpu_equal[method.label] = [(g["response"], g["n_new_tokens"]) for g in got] == \
                [(c["response"], c["n_new_tokens"]) for c in cpu]
    return {"max_score_difference": worst, "engine_equals_reference": cells,
            "all_cells_equal_reference": all(cells.values()),
            "device_equals_cpu": cpu_equal or None,
            "all_cells_device_equals_cpu": all(cpu_equal.values()) if cpu_equal else None}


# ---------------------------------------------------------------- b. throughput

def big_models(shapes: dict, device: str) -> Models:
    spec = lambda name, kind="causal_lm": ModelSpec(name, kind=kind, dtype="bfloat16", device=device)
    return Models(base=spec(shapes["base"]), tuned=spec(shapes["guide"]), untuned=spec(shapes["guide"]),
                  explicit=spec(shapes["guide"], "token_reward"))


def rows_of(n: int) -> list[dict]:
    return [{"id": f"g{i:04d}", "prompt": f"{OPENINGS[i % len(OPENINGS)]} ({i})"} for i in range(n)]


def timed(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def throughput(shapes: dict, runs: list, device: str, naive_prompts: int, report: Report) -> None:
    from jobs.bench import NaiveIVG

    start = time.perf_counter()
    ivg_cell = MethodConfig(token="implicit", chunk="explicit", W=2, K=2, L=2)  # loads every role
    engine = Engine.local(GenerationConfig(big_models(shapes, device), DecodeConfig(), (ivg_cell,)))
    roles = engine.roles.roles
    models = {"base": roles["base"].models[0], "tuned": roles["implicit"].models[0],
              "untuned": roles["implicit"].models[1], "explicit": roles["explicit"].models[0]}
    timer = ForwardTimer()
    timer.instrument(roles)
    report.data["models"] = {"shapes": shapes, "build_s": round(time.perf_counter() - start, 1),
                             "parameters": {r: sum(p.numel() for p in m.model.parameters()) for r, m in models.items()}}
    for (W, K, L, new), batches in runs:
        method = MethodConfig(token="implicit", chunk="explicit", W=W, K=K, L=L)
        decode = DecodeConfig(max_new_tokens=new, temperature=0.7, stop=(), stop_at_eos=False)
        config = dataclasses.replace(engine.config, decode=decode, methods=(method,))
        ivg = Engine(config, engine.roles, engine.tokenizer, set(), engine.truncate)
        ivg.run(rows_of(1), dataclasses.replace(method, L=min(L, 2)))  # warm-up: kernels, allocator
        for n in batches:
            name = f"W{W}K{K}L{L}_{new}tok_{n}prompts"
            report.section(name, lambda: one_shape(ivg, models, method, decode, n, naive_prompts, timer, device,
                                                   NaiveIVG), need_s=30)


def one_shape(engine: Engine, models: dict, method: MethodConfig, decode: DecodeConfig, n: int, naive_prompts: int,
              timer: ForwardTimer, device: str, NaiveIVG) -> dict:
    rows = rows_of(n)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timer.reset()
    seconds = timed(lambda: engine.run(rows, method))
    out = {"engine_s": seconds, "forward_fraction": timer.seconds / seconds, "peak_memory_gib": peak_memory_gib(device)}
    rows_per_prompt = method.W * method.K
    sampled = n * rows_per_prompt * decode.max_new_tokens  # every child row samples each token
    out["ivg_sampled_tokens_per_s"] = sampled / seconds
    out["ivg_prompts_per_s"] = n / seconds

    base = models["base"]
    ids = [base.tokenizer(f"{r['prompt']}").input_ids for r in rows for _ in range(rows_per_prompt)]
    width = max(map(len, ids))
    pad = base.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=base.device)
    mask = (torch.arange(width, device=base.device)[None] >= torch.tensor([width - len(i) for i in ids],
                                                                          device=base.device)[:, None]).long()
    gen = dict(max_new_tokens=decode.max_new_tokens, min_new_tokens=decode.max_new_tokens, do_sample=True,
               temperature=decode.temperature, top_k=0, top_p=1.0, pad_token_id=pad)
    with torch.no_grad():
        base.model.generate(input_ids=input_ids[:2], attention_mask=mask[:2], **{**gen, "max_new_tokens": 2,
                                                                                  "min_new_tokens": 2})
        floor_s = timed(lambda: base.model.generate(input_ids=input_ids, attention_mask=mask, **gen))
    out["plain_generate_s"] = floor_s
    out["plain_sampled_tokens_per_s"] = len(ids) * decode.max_new_tokens / floor_s
    out["ivg_over_plain_tokens_per_s"] = out["ivg_sampled_tokens_per_s"] / out["plain_sampled_tokens_per_s"]
    out["peak_memory_gib_with_plain"] = peak_memory_gib(device)

    naive = NaiveIVG(models, method, decode)
    k = min(naive_prompts, n)
    naive_s = timed(lambda: [naive.run(r["prompt"]) for r in rows[:k]])
    out["naive_prompts"] = k
    out["naive_prompts_per_s"] = k / naive_s
    out["speedup_vs_naive"] = out["ivg_prompts_per_s"] / out["naive_prompts_per_s"]
    return out


# ---------------------------------------------------------------- c. the bench's engine keys

def bench_keys(device: str, out: Path) -> dict:
    from jobs.bench import run_suite

    report = run_suite("smoke", device, threads=int(os.environ.get("IVG_BENCH_THREADS", "1")), log=lambda *_: None)
    (out / "bench_smoke.json").write_text(json.dumps(report, indent=1, default=str))
    return {"results": report.get("results")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (dry run of every code path)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and batches instead of 8B / 135M")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for the JSON (default $OUT)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    p.add_argument("--naive-prompts", type=int, default=4, help="prompts the naive baseline decodes per shape")
    p.add_argument("--skip", nargs="*", default=[], choices=["exactness", "throughput", "bench"])
    args = p.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible (use --cpu for a dry run)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = "tiny" if args.tiny else "gpu"
    report = Report(out / "gpu_check.json", args.budget_s)
    report.data.update(machine=device_info(device), size=size, argv=sys.argv[1:])
    report.save()
    if "exactness" not in args.skip:
        # the dry run only proves the code path (tests/unit/test_engine.py checks every cell on the CPU)
        dry = dict(n_prompts=1, cells=[("none", "none"), ("implicit", "explicit"), ("explicit", "implicit")])
        report.section("exactness", lambda: exactness(device, **(dry if args.tiny else {"n_prompts": len(PROMPTS)})))
    if "throughput" not in args.skip:
        report.section("throughput_setup", lambda: throughput(SHAPES[size], RUNS[size], device, args.naive_prompts,
                                                              report) or {}, need_s=60)
    if "bench" not in args.skip:
        report.section("bench_smoke", lambda: bench_keys(device, out), need_s=60)
    statuses = [s["status"] for s in report.data["sections"].values()]
    print(f"[gpu_check] {sum(s == 'ok' for s in statuses)}/{len(statuses)} sections ok -> {report.path}")
    return 0 if all(s == "ok" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
