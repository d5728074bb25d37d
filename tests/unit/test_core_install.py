"""The decoder is a plain install: ivg's core needs torch + transformers only, and imports no application."""

import pytest
import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APPLICATIONS = ("ivg.offline", "ivg.train", "ivg.eval", "pipeline", "jobs")
# what the extras bring: a plain install has none of it
EXTRAS = ("ray", "trl", "peft", "alpaca_eval", "sklearn", "vaderSentiment", "datasets", "pyarrow", "pandas",
          "scipy", "matplotlib", "gguf", "accelerate")  # (numpy, pyyaml, tqdm come with transformers)
CORE = sorted(p for p in (ROOT / "ivg").glob("*.py"))



def closure(roots: list[str]) -> set[str]:
    """The distributions a plain `pip install ivg` brings: the core requirements and theirs (no extras)."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional or platform dependency not installed here
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def plain_site(tmp: Path) -> Path:
    """A site folder holding only the core's distributions (symlinked from this environment)."""
    site = tmp / "site"
    site.mkdir()
    core = [d.split(">")[0].split("=")[0].split("<")[0].strip()
            for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for name in closure(core):
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    return site


RUN_ENGINE = """
from ivg.config import GenerationConfig, MethodConfig, Models, ModelSpec
from ivg.engine import Engine
spec = lambda name, kind="causal_lm": ModelSpec(name, kind=kind, device="cpu")
models = Models(base=spec("tiny:base"), tuned=spec("tiny:tuned"), untuned=spec("tiny:untuned"),
                explicit=spec("tiny:trm", "token_reward"))
method = MethodConfig(token="implicit", chunk="explicit", W=2, K=2, L=3)
engine = Engine.local(GenerationConfig(models=models, methods=(method,)))
rows = engine.run([{"id": "a", "prompt": "The film"}], method)
assert rows[0]["status"] == "ok" and rows[0]["n_new_tokens"] > 0, rows
print("engine ok")
"""


def plain_python(tmp: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` with only the plain install's packages importable: no site-packages (-S), the core's
    distributions and the checkout on the path."""
    env = {"PYTHONPATH": f"{ROOT}:{plain_site(tmp)}", "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_plain_install_runs_an_engine_without_any_extra(tmp_path):
    out = plain_python(tmp_path, RUN_ENGINE)
    assert out.returncode == 0 and "engine ok" in out.stdout, out.stderr[-3000:]


def test_a_plain_install_lacks_the_extras(tmp_path):
    """The check above could pass by accident if the extras leaked in: show that they do not."""
    out = plain_python(tmp_path, "import ivg.eval.gold")
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, out.stderr[-2000:]
    assert not set(EXTRAS) & {p.name for p in (tmp_path / "site").iterdir()}


def test_core_dependencies_are_torch_and_transformers():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in deps}
    assert names == {"torch", "transformers", "safetensors", "psutil"}, names


def test_core_modules_import_no_application_at_all():
    """Not even lazily inside a function: every import statement of ivg/*.py, read from the source."""
    assert len(CORE) >= 10, CORE
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(APPLICATIONS) and name.split(".")[0] not in EXTRAS, f"{path.name}: {name}"
