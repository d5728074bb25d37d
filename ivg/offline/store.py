"""The build-once store: every cached artifact (assets, guides, gold model, probe) is built here.

    path = build_once(folder, key, build)

returns `folder` once it holds a complete build for `key`; otherwise `build(tmp)` fills a temp folder
beside it, a marker (`ivg-build.json`: the key, every produced file with its size and sha256, the
build's facts) is written last, and the folder is renamed into place. So a folder is either a whole
build of the key it records or not taken: a crash leaves only a temp folder, and a changed key (a new
pin, another recipe, other training data) rebuilds instead of reusing what an older recipe made.
The key must cover everything that changes the artifact; `digest(key)` names folders of variants.
"""

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from ivg.files import atomic_path, sha256_file

MARKER = "ivg-build.json"


def cache_root() -> Path:
    """$IVG_CACHE, else ~/.cache/ivg."""
    return Path(os.environ.get("IVG_CACHE") or Path.home() / ".cache" / "ivg").expanduser()


def canonical(key) -> object:
    """The key as plain JSON data (tuples as lists, paths as strings), as the marker stores it."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def digest(key, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(canonical(key), sort_keys=True).encode()).hexdigest()[:n]


def marker(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_built(folder: Path, key) -> bool:
    """A marker for this key, and every file it lists still there at its size. Sizes, not hashes:
    this runs on every lookup, and hashing a 1 GB model there would cost seconds."""
    folder, m = Path(folder), marker(folder)
    if m is None or m.get("key") != canonical(key) or not m.get("files"):
        return False
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == f["bytes"]
               for rel, f in m["files"].items())


def build_once(folder: Path, key, build: Callable[[Path], dict | None], *, force: bool = False,
               log: Callable[[str], None] | None = None) -> Path:
    """`folder`, built by `build(empty temp folder) -> facts` unless already built for `key`."""
    folder = Path(folder)
    if not force and is_built(folder, key):
        return folder
    start = time.perf_counter()
    with atomic_path(folder, fsync=False) as tmp:
        tmp.mkdir()
        facts = build(tmp) or {}
        produced = sorted(p for p in tmp.rglob("*") if p.is_file())
        record = {"key": canonical(key), "facts": canonical(facts),
                  "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                            for p in produced},
                  "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")  # last: its presence means complete
    if log:
        log(f"built {folder} in {time.perf_counter() - start:.0f}s")
    return folder
