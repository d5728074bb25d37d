"""Ray clusters started by tests, found and stopped by their own temp dir (never `ray stop`, which
stops every Ray cluster on the machine, other people's too). The code lives in pipeline/loopback.py,
shared with scripts/loopback_cluster.py and `jobs.bench --suite cluster`."""

from contextlib import contextmanager

from pipeline.loopback import LoopbackCluster, NodeSpec, free_ports, from_cluster_yaml, processes_of, stop_processes

from helpers.pipeline import ray_driver

__all__ = ["LoopbackCluster", "NodeSpec", "free_ports", "from_cluster_yaml", "processes_of", "stop_cluster",
           "connected"]


def stop_cluster(temp_dir: str) -> None:
    stop_processes(temp_dir)


@contextmanager
def connected(cluster: LoopbackCluster):
    """This test process as a driver of `cluster` (auth off, as the cluster's own processes run)."""
    with ray_driver(address=cluster.address):
        yield
