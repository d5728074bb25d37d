"""`ray job submit` a command from this checkout, recording its git revision in the job's results.

  ivg submit --address http://HEAD:8265 -- generate --config jobs/configs/summarization.yaml --output /shared/runs/tldr
  ivg submit --address http://HEAD:8265 --no-wait -- run --config jobs/configs/sentiment-full.yaml
  ivg submit --dry-run -- generate --config jobs/configs/smoke.yaml --output /tmp/smoke   # print the command

The upload (`--working-dir`, default: this checkout) carries no usable .git, so a job cannot tell
which code made its results; this adds IVG_GIT_REVISION=<sha>[-dirty] to the job's environment
(`--runtime-env-json`, merged with yours), which ivg/provenance.py records in every manifest. An
ivg command after `--` (generate, run, evaluate, ...) runs as `python -m jobs.cli COMMAND ...` with
the cluster's `python` (start the cluster from the project's venv: README, "On a Ray cluster");
anything else runs as given. Other flags before `--` go to `ray job submit` unchanged (--no-wait,
--submission-id, --entrypoint-num-gpus, ...). The same by hand:

  ray job submit --address ADDR --working-dir . \\
      --runtime-env-json "{\\"env_vars\\": {\\"IVG_GIT_REVISION\\": \\"$(git rev-parse HEAD)\\"}}" -- python -m jobs.generate ...
"""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from jobs import cli

ROOT = Path(__file__).resolve().parents[1]


def parser(prog: str):
    p = cli.parser(prog, __doc__)
    p.add_argument("--address", metavar="ADDR", help="the cluster's dashboard (default: $RAY_ADDRESS, else Ray's own default)")
    p.add_argument("--working-dir", default=str(ROOT), metavar="DIR", help="what to upload (default: this checkout)")
    p.add_argument("--runtime-env-json", metavar="JSON", help="a runtime env to merge IVG_GIT_REVISION into")
    p.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command and exit")
    return p


def main(argv=None, prog: str = "python -m jobs.submit") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser(prog)
    split = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = p.parse_known_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        p.error("give the command after `--`, e.g.: -- generate --config FILE --output DIR")
    return cli.guarded(args, lambda: submit(args, passthrough, command))


def submit(args, passthrough: list[str], command: list[str]) -> int:
    from ivg.config import ConfigError
    from ivg.provenance import REVISION_ENV, git_revision

    try:
        env = json.loads(args.runtime_env_json) if args.runtime_env_json else {}
    except ValueError as e:
        raise ConfigError(f"--runtime-env-json: not JSON ({e})") from None
    if not isinstance(env, dict):
        raise ConfigError("--runtime-env-json: must be a JSON object")
    if "--runtime-env" in passthrough:
        raise ConfigError("--runtime-env: give it as --runtime-env-json, so IVG_GIT_REVISION can be merged into it")
    git = git_revision()
    if git["revision"] is None:
        print(f"warning: {args.working_dir} is not a git checkout; the job records no revision", file=sys.stderr)
    else:
        env = {**env, "env_vars": {**env.get("env_vars", {}),
                                   REVISION_ENV: git["revision"] + ("-dirty" if git["dirty"] else "")}}
    if command[0] in cli.COMMANDS:
        command = ["python", "-m", "jobs.cli", *command]
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [ray, "job", "submit", *(["--address", args.address] if args.address else []),
           "--working-dir", args.working_dir, "--runtime-env-json", json.dumps(env), *passthrough, "--", *command]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
