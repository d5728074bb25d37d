"""Generate responses for every method of a config: one Parquet file per shard under --output.

  ivg generate --config jobs/configs/smoke.yaml --output runs/smoke
  ivg generate --config jobs/configs/smoke.yaml --output runs/smoke decode.max_new_tokens=4 --limit 4
  ivg generate --config jobs/configs/smoke.yaml --output runs/smoke --dry-run     # check, load nothing
  ivg submit -- generate --config jobs/configs/smoke.yaml --output /shared/runs/smoke   # on a cluster

Config, output directory and the whole input are checked before Ray starts. Locally it starts an
embedded Ray of its own; under `ray job submit` ($RAY_ADDRESS is set) or with --address it joins that
cluster. A rerun into the same --output skips finished shards. Configs with `train:` or
`experiment:` sections (sentiment-*.yaml, weak-to-strong.yaml) train their guides first: `ivg run`.
Output layout and columns: README.md, "Outputs".
"""

import sys

from jobs import cli


def parser(prog: str):
    p = cli.parser(prog, __doc__)
    cli.add_config_flags(p)
    p.add_argument("--output", metavar="DIR", help="output directory (run.output); a rerun skips finished shards")
    cli.add_run_flags(p)
    cli.add_ray_flags(p)
    return p


def main(argv=None, prog: str = "python -m jobs.generate") -> int:
    args = parser(prog).parse_intermixed_args(argv)
    return cli.guarded(args, lambda: run(args))


def run(args) -> int:
    import os

    from ivg.config import from_dict
    from pipeline.config import Config

    config = from_dict(Config, cli.config_data(args), "config")
    if args.print_config:
        cli.print_config(config.resolved())
        return 0
    from pipeline.coordinator import generate, preflight

    cli.setup_logging()
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    checked = preflight(config, local=local)
    print(f"[check] {config.data.path}: {checked.prompts} prompts in {checked.shards} shards x "
          f"{len(config.methods)} methods -> {config.run.output}{' (new)' if checked.fresh else ''}",
          file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    with cli.ray_session(args):
        summary = generate(config, checked=checked)
    print(f"[generate] {summary.status}: {summary.done} shards written, {summary.skipped} skipped, "
          f"{summary.failed} failed -> {summary.output}")
    return 0 if summary.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
