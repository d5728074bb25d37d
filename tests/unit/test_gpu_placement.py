"""GPUs: what `placement: auto` and unset num_gpus become on a cluster with or without GPUs, and the
loud warning of a server Ray gave a GPU that torch cannot see (pipeline/coordinator.py:plan_servers,
pipeline/servers.py:warn_if_gpus_unseen, ivg/models.py:resolve_device)."""

import logging

import pytest

from ivg.config import from_dict
from pipeline.config import PipelineConfig
from pipeline.coordinator import plan_servers

ROLES = ["base", "explicit", "implicit"]


def plan(pipeline: dict, gpus: float, roles=ROLES):
    placement, specs = plan_servers(from_dict(PipelineConfig, pipeline, "pipeline"), roles, gpus)
    return placement, {name: spec.num_gpus for name, spec in specs.items()}


def test_auto_on_a_gpu_cluster_gives_each_role_its_own_gpu():
    assert plan({}, gpus=4) == ("separate", {"base": 1, "explicit": 1, "implicit": 1})


def test_auto_on_fewer_gpus_than_roles_puts_them_all_on_one():
    assert plan({}, gpus=1) == ("colocated", {"colocated": 1})


def test_auto_on_cpu_is_one_colocated_actor_without_gpus():
    assert plan({}, gpus=0) == ("colocated", {"colocated": 0})


def test_a_num_gpus_that_is_set_is_kept():
    assert plan({"servers": {"explicit": {"num_gpus": 0}, "base": {"num_gpus": 2}}}, gpus=4) == (
        "separate", {"base": 2, "explicit": 0, "implicit": 1})
    assert plan({"placement": "separate"}, gpus=0) == ("separate", {"base": 0, "explicit": 0, "implicit": 0})


def test_more_gpus_than_the_cluster_has_is_said_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.coordinator"):
        assert plan({"placement": "separate"}, gpus=2)[0] == "separate"
    assert "ask for 3 GPU(s) (base: 1 x 1, explicit: 1 x 1, implicit: 1 x 1) but the cluster has 2" in caplog.text


def test_a_server_given_a_gpu_torch_cannot_see_warns(monkeypatch, caplog):
    import ray
    import torch

    from pipeline import servers

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pipeline.servers"):
        servers.warn_if_gpus_unseen(["base"])
    assert "model server base was given GPU(s) [0]" in caplog.text and "its models run on the CPU" in caplog.text


def test_device_cuda_without_cuda_is_one_clear_line(monkeypatch):
    import torch

    from ivg.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"^device 'cuda:1': torch .* sees no CUDA device here"):
        resolve_device("cuda:1")
    assert resolve_device("auto").type == "cpu"
