"""A multi-node Ray cluster on this machine, with cluster.yaml's node types (pipeline/loopback.py).

  python scripts/loopback_cluster.py start [--cpus gpu_base=1,gpu_guide=2] [--head-cpus 0]
      start a head and cluster.yaml's worker nodes (GPUs fake); prints the address, dashboard and ROOT
  RAY_AUTH_MODE=disabled python -m jobs.generate --config C --output DIR --address ADDRESS
      a run on it (the config's servers asking for base_gpu / guide_gpu, as cluster.yaml's comment shows)
  python scripts/loopback_cluster.py kill ROOT NODE   SIGKILL one node (raylet, agents, workers): node loss
  python scripts/loopback_cluster.py add ROOT NODE    start a node like NODE again (a new raylet)
  python scripts/loopback_cluster.py stop ROOT        stop every process of the cluster, remove ROOT

Everything is found by its temp dir under ROOT; nothing here runs `ray stop`, which would stop every
Ray cluster on the machine.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.loopback import LoopbackCluster, from_cluster_yaml, stop_processes  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/loopback_cluster.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start")
    start.add_argument("--cluster-yaml", default=str(Path(__file__).resolve().parents[1] / "cluster.yaml"))
    start.add_argument("--cpus", default="", help="logical CPUs per node type, e.g. gpu_base=1,gpu_guide=2")
    start.add_argument("--head-cpus", type=int, default=0)
    for name in ("kill", "add"):
        s = sub.add_parser(name)
        s.add_argument("root")
        s.add_argument("node", help="a node name: h (head), b0, g0, g1, ...")
    sub.add_parser("stop").add_argument("root")
    args = p.parse_args(argv)

    if args.command == "start":
        cpus = {k: int(v) for k, v in (item.split("=") for item in args.cpus.split(",") if item)}
        cluster = LoopbackCluster(from_cluster_yaml(Path(args.cluster_yaml), cpus, args.head_cpus))
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        cluster.save()
        print(json.dumps({"address": cluster.address, "dashboard": cluster.dashboard_url, "root": cluster.root,
                          "nodes": {n.name: n.node_id for n in cluster.nodes}}, indent=1))
    elif args.command == "stop":
        stop_processes(args.root)
        shutil.rmtree(args.root, ignore_errors=True)
    else:
        cluster = LoopbackCluster.load(args.root)
        node = cluster.node(args.node)
        if args.command == "kill":
            cluster.kill(node)
            print(f"killed {node.name}; dead after {cluster.wait_dead(node):.1f}s")
        else:
            new = cluster.add(node.spec)
            cluster.save()
            print(f"started {new.name} ({new.node_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
