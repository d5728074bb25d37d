"""Actors carry names the Ray dashboard shows (ivg-<server>-<replica>, ivg-search-<k>), and a search
actor finds its servers by those names; stopping the run frees them for the next one."""

import pytest
import ray

from helpers.pipeline import tiny_config, write_prompts
from helpers.reliability import METHODS
from pipeline.coordinator import start_cluster, stop_cluster


@pytest.mark.timeout(120)
def test_actors_are_named_and_their_names_freed(ray_local, tmp_path):
    config = tiny_config(write_prompts(tmp_path / "p.jsonl"), tmp_path / "out", METHODS, placement="separate",
                         search_actors=2, servers={r: {"num_cpus": 0.2} for r in ("base", "implicit", "explicit")})
    for _ in range(2):  # the second start reuses the names the first one freed
        cluster = start_cluster(config)
        named = set(ray.util.list_named_actors())  # this job's namespace: another run's names cannot clash
        assert named == {"ivg-base-0", "ivg-implicit-0", "ivg-explicit-0", "ivg-search-0", "ivg-search-1"}
        stop_cluster(cluster)
