"""What made a number: package versions and the code's git revision, recorded with every result."""

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

VERSIONED = ("ivg", "torch", "transformers", "ray", "pyarrow", "datasets", "numpy", "trl", "peft", "alpaca-eval")
REVISION_ENV = "IVG_GIT_REVISION"  # set by whoever ships the code without its .git (e.g. `ray job submit`)


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_revision() -> dict:
    """The checkout the code came from; under `ray job submit` (an upload without .git) the revision the
    submitter recorded in $IVG_GIT_REVISION ("<sha>" or "<sha>-dirty"), else None."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    recorded = os.environ.get(REVISION_ENV)
    if recorded:
        sha, _, flag = recorded.partition("-")
        return {"revision": sha, "dirty": flag == "dirty", "source": REVISION_ENV}
    return {"revision": None, "dirty": None, "source": None}
