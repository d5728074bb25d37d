"""On a cluster that has GPUs (here a Ray with 3 declared GPUs, which torch cannot see): placement auto
puts every role on its own GPU, and each server says loudly that its models run on the CPU."""

import logging

import pytest
import ray

from helpers.pipeline import ray_driver, read_rows, tiny_config, write_prompts
from helpers.reliability import METHODS
from pipeline.coordinator import generate


@pytest.fixture(scope="module")
def ray_with_gpus():
    with ray_driver(address="local", num_cpus=2, num_gpus=3, include_dashboard=False):
        yield


@pytest.mark.timeout(180)
def test_auto_placement_on_a_gpu_cluster_gives_each_role_a_gpu(ray_with_gpus, tmp_path):
    config = tiny_config(write_prompts(tmp_path / "p.jsonl"), tmp_path / "out", METHODS, placement="auto",
                         search_actors=1, servers={r: {"num_cpus": 0.25} for r in ("base", "implicit", "explicit")})
    summary = generate(config)
    assert (summary.status, summary.placement) == ("finished", "separate")
    assert len(read_rows(tmp_path / "out")) == 8 * 2


def test_a_server_on_a_gpu_torch_cannot_see_warns(ray_with_gpus):
    @ray.remote(num_gpus=1, num_cpus=0.1)
    def warnings_of_a_server():
        from pipeline.servers import warn_if_gpus_unseen

        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("pipeline.servers").addHandler(handler)
        warn_if_gpus_unseen(["base"])
        return [r.getMessage() for r in records]

    (message,) = ray.get(warnings_of_a_server.remote())
    assert message.startswith("WARNING: model server base was given GPU(s) [") and "run on the CPU" in message
