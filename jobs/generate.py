"""Generate responses for every method of a config: `python -m jobs.generate --config FILE`.

Locally it starts an embedded Ray (`ray.init()` of its own); under `ray job submit` (RAY_ADDRESS is
set) or with --address it joins that cluster. Flags override the config. See pipeline/coordinator.py.

  python -m jobs.generate --config jobs/configs/smoke.yaml --output runs/smoke
  RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python -m jobs.generate --config jobs/configs/smoke.yaml --output /tmp/smoke
"""

import argparse
import os
import sys

import ray

from pipeline.config import load_config
from pipeline.coordinator import generate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    p.add_argument("--input", help="prompts: a Parquet / JSONL file or an HF datasets id (overrides data.path)")
    p.add_argument("--output", help="output directory (overrides run.output); a rerun skips finished shards")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded Ray)")
    p.add_argument("--num-cpus", type=float, help="CPUs of the embedded Ray (default: all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, input=args.input, output=args.output)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # "local": a fresh Ray of our own, never some other cluster found on this machine
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    try:
        summary = generate(config)
    finally:
        ray.shutdown()
    print(f"[generate] {summary.status}: {summary.done} shards written, {summary.skipped} skipped, "
          f"{summary.failed} failed -> {summary.output}")
    return 0 if summary.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
