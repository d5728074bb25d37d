"""Files that appear whole or not at all, and their checksums: the one atomic writer of the project.

Every artifact (a shard's Parquet file, a manifest, a summary, a model folder) is written to a temp
name beside its final path and renamed into place, so a reader or a rerun never sees half a file.
"""

import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_name(path: Path) -> Path:
    """A temp path beside `path`: `NAME.tmp-<uuid>` (never `*.parquet`, so globs never see it)."""
    return path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")


@contextmanager
def atomic_path(path: Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path to write (a file or a folder); on success it is renamed to `path`, replacing
    what was there; on an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # a crash after the rename must not leave a renamed but empty file
        if path.is_dir() and tmp.is_dir():  # a folder cannot replace a folder in one rename
            old = temp_name(path)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(*folders: Path) -> int:
    """Temp files left by an interrupted writer (never renamed, so never a finished file)."""
    stale = [p for folder in folders if Path(folder).is_dir() for p in Path(folder).glob("*.tmp-*")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)
