"""Shared fixtures. Helpers live in tests/helpers/ (a package: `from helpers.models import tiny`).

Tests by speed: tests/unit (in-process, seconds), tests/integration (training, jobs, benchmarks),
tests/cluster (Ray). `pytest -q` runs all of them (CI); `pytest -m "not slow"` skips everything
marked slow, which includes every test under tests/cluster.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `helpers` importable from every test folder

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers.models import config, rows  # noqa: E402
from helpers.pipeline import ray_driver  # noqa: E402


def pytest_collection_modifyitems(config, items):
    cluster = Path(__file__).parent / "cluster"
    for item in items:
        if cluster in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def make_config():
    return config


@pytest.fixture
def prompt_rows():
    return rows()


@pytest.fixture(scope="module")
def ray_local():
    """One embedded 2-CPU Ray for a test module (starting Ray costs seconds; share it)."""
    with ray_driver(address="local", num_cpus=2, include_dashboard=False):
        yield
