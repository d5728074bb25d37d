"""Ray clusters started by tests, found and stopped by their own temp dir (never `ray stop`, which
stops every Ray cluster on the machine, other people's too). The code lives in pipeline/loopback.py,
shared with scripts/loopback_cluster.py and `jobs.bench --suite cluster`."""

import os
from contextlib import contextmanager

from pipeline.loopback import LoopbackCluster, NodeSpec, free_ports, from_cluster_yaml, processes_of, stop_processes

from helpers.pipeline import RAY_ENV

__all__ = ["LoopbackCluster", "NodeSpec", "free_ports", "from_cluster_yaml", "processes_of", "stop_cluster",
           "connected"]


def stop_cluster(temp_dir: str) -> None:
    stop_processes(temp_dir)


@contextmanager
def connected(cluster: LoopbackCluster):
    """This test process as a driver of `cluster` (auth off, as the cluster's own processes run)."""
    import ray

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
