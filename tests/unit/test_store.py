"""The build-once store: a folder is reused only for the key that built it, and appears whole or not at all."""

import json

import pytest

from ivg.offline.store import MARKER, build_once, digest, is_built


def writer(calls, text="x"):
    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "card.md").write_text("card")
        return {"rows": 3}
    return build


def test_built_once_per_key_and_rebuilt_for_another(tmp_path):
    calls = []
    out = build_once(tmp_path / "a", {"recipe": 1}, writer(calls))
    assert out == tmp_path / "a" and len(calls) == 1 and is_built(out, {"recipe": 1})
    marker = json.loads((out / MARKER).read_text())
    assert marker["facts"] == {"rows": 3} and set(marker["files"]) == {"weights.bin", "sub/card.md"}
    build_once(tmp_path / "a", {"recipe": 1}, writer(calls))
    assert len(calls) == 1  # reused
    build_once(tmp_path / "a", {"recipe": 2}, writer(calls, "y"))
    assert len(calls) == 2 and (out / "weights.bin").read_text() == "y" and not is_built(out, {"recipe": 1})
    build_once(tmp_path / "a", {"recipe": 2}, writer(calls), force=True)
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folders left


def test_a_changed_or_truncated_file_is_not_built(tmp_path):
    out = build_once(tmp_path / "a", "k", writer([]))
    (out / "weights.bin").write_text("longer than before")
    assert not is_built(out, "k")
    (out / MARKER).write_text("{not json")
    assert not is_built(out, "k")


def test_a_failed_build_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    build_once(tmp_path / "a", "old", writer([]))

    def broken(folder):
        (folder / "half").write_text("half")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        build_once(tmp_path / "a", "new", broken)
    assert is_built(tmp_path / "a", "old") and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_digest_is_stable_and_covers_the_key():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": (1, 2), "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
