"""A multi-node Ray cluster on one machine: a head and worker raylets on this host, each node with
the resources of one of cluster.yaml's node types, for the cluster tests and `jobs.bench --suite cluster`.

Every node is a real `ray start` (its own raylet, object store, agents and workers) with its own temp
dir under one root (e.g. /tmp/ivgr-1a2b/b0), so a node is killed by killing the processes that name
its dir, and the whole cluster is stopped by the processes that name the root: never `ray stop`,
which stops every Ray cluster on the machine, other people's too. GPUs are fake (`--num-gpus`): Ray
schedules by them, the models run on the CPU. The head is started with a short health check, so the
GCS declares a killed node dead in seconds rather than the default half minute.

  python scripts/loopback_cluster.py start          # prints the address and ROOT
  python scripts/loopback_cluster.py kill ROOT b0    # lose a node; `add ROOT b0` brings one back
  python scripts/loopback_cluster.py stop ROOT
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# GCS health checks of raylets: a dead node is declared dead after ~period * threshold. Tolerant
# enough for a loaded 2-core box (a slow raylet is not a dead one), quick enough for tests.
HEALTH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
          "health_check_timeout_ms": 2000, "health_check_failure_threshold": 4}
OBJECT_STORE = 128 * 2**20  # bytes per node: the tiny models' messages are small (Ray's minimum is 75 MiB)


@dataclass(frozen=True)
class NodeSpec:
    name: str  # short: it names the node's temp dir, and Ray's socket paths are limited to ~107 chars
    num_cpus: int = 1  # logical (`ray start` takes whole numbers): what Ray schedules by, not cores
    num_gpus: int = 0  # fake
    resources: dict = field(default_factory=dict)  # custom resources, e.g. {"base_gpu": 1}
    memory: int | None = None  # bytes of Ray's `memory` resource (default: Ray's share of the machine's)


@dataclass
class Node:
    spec: NodeSpec
    temp_dir: str
    node_id: str | None = None  # Ray's id, once the node registered

    @property
    def name(self) -> str:
        """Its Ray node name (`ray start --node-name`): the spec's, plus r1, r2... for a restarted node."""
        return os.path.basename(self.temp_dir)


def from_cluster_yaml(path: Path = ROOT / "cluster.yaml", cpus: dict[str, int] | None = None,
                      head_cpus: int = 0) -> list[NodeSpec]:
    """The head plus min_workers nodes of every worker type, with that type's GPUs (fake) and custom
    resources. Logical CPUs per type: `cpus`, else 1 (not cluster.yaml's 8: Ray starts idle workers
    by the CPU count, and 2 cores host every node). The head gets `head_cpus`, 0 by default: no actor
    lands there, so killing a worker never takes the GCS or the driver with it."""
    raw = yaml.safe_load(Path(path).read_text())
    nodes = [NodeSpec("h", head_cpus)]
    for type_name, t in raw["available_node_types"].items():
        if type_name == raw["head_node_type"]:
            continue
        res = dict(t.get("resources", {}))
        gpus = int(res.pop("GPU", 0))
        res.pop("CPU", None)
        short = type_name.removeprefix("gpu_")[0]  # gpu_base -> b0, gpu_guide -> g0, g1
        nodes += [NodeSpec(f"{short}{i}", (cpus or {}).get(type_name, 1), gpus, res)
                  for i in range(t.get("min_workers", 0))]
    return nodes


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def processes_of(temp_dir: str) -> list[psutil.Process]:
    """Every running process of the Ray node(s) rooted at temp_dir: those naming it, and their descendants."""
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}  # e.g. `loopback_cluster.py stop ROOT` and its shell
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid in spared:
            continue
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                roots.append(p)
        except psutil.Error:
            pass
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return [p for pid, p in found.items() if pid not in spared and _alive(p)]


def _alive(p: psutil.Process) -> bool:
    """Running: not gone, and not a zombie (dead, only waiting for a parent that may never reap it)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_processes(temp_dir: str, sig=signal.SIGTERM, grace_s: float = 5) -> None:
    """Signal every process of temp_dir, then SIGKILL what is still running after grace_s."""
    procs = processes_of(temp_dir)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def ray_env(extra: dict | None = None) -> dict:
    """The environment of `ray start`, which its raylet's workers inherit: this checkout importable,
    the venv's python and ray on PATH, token auth off (Ray 2.60 turns it on for `ray start`), one
    thread per process (2 cores are shared by every node)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}:{path}" if path else str(ROOT),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(extra or {})}


class LoopbackCluster:
    """`with LoopbackCluster(from_cluster_yaml()) as c: ray.init(address=c.address)`. The head runs the
    dashboard: Ray's state API (which node an actor is on, which nodes are alive) is served by it."""

    def __init__(self, nodes: list[NodeSpec], root: str | None = None, env: dict | None = None):
        assert nodes and nodes[0].name == "h", "the first node is the head"
        self.specs, self.env = nodes, ray_env(env)
        self.root = root or tempfile.mkdtemp(prefix="ivgr-", dir="/tmp")  # short: socket paths are limited
        self.nodes: list[Node] = []
        self.launches = Counter()  # spec name -> nodes started under it (each gets its own dir)
        self.gcs_port = self.dashboard_port = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> "LoopbackCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 180) -> "LoopbackCluster":
        """The head, then every worker at once (each `ray start` takes seconds, mostly importing ray)."""
        self.gcs_port, self.dashboard_port = free_ports(2)
        self._start([self.specs[0]], timeout_s, head=True)
        self._start(self.specs[1:], timeout_s)
        self.wait_registered(self.nodes, timeout_s)
        return self

    def add(self, spec: NodeSpec, timeout_s: float = 180) -> Node:
        """Start another worker node (e.g. the one a test killed, back again) and wait until it is alive."""
        [node] = self._start([spec], timeout_s)
        self.wait_registered([node], timeout_s)
        return node

    def _start(self, specs: list[NodeSpec], timeout_s: float, head: bool = False, attempts: int = 2) -> list[Node]:
        """`ray start` these nodes at once. A raylet that a loaded GCS did not register in time (Ray's
        own startup timeout) is stopped and started again once, in a new dir, under a new name."""
        started = []
        for attempt in range(attempts):
            launched = [self._launch(spec, head) for spec in specs]
            failed = []
            for node, proc in launched:
                try:
                    log, _ = proc.communicate(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    log = f"did not return in {timeout_s:g}s"
                if proc.returncode == 0:
                    started.append(node)
                else:
                    stop_processes(node.temp_dir, signal.SIGKILL)
                    self.nodes.remove(node)
                    failed.append((node, log))
            if not failed:
                return started
            if head or attempt == attempts - 1:
                node, log = failed[0]
                raise RuntimeError(f"`ray start` of node {node.name} failed:\n{log[-3000:]}")
            specs = [node.spec for node, _ in failed]
        return started

    def _launch(self, spec: NodeSpec, head: bool = False) -> tuple:
        n = self.launches[spec.name]
        self.launches[spec.name] += 1
        temp_dir = os.path.join(self.root, spec.name + (f"r{n}" if n else ""))  # a restarted node: a new dir
        node_port, object_port, metrics, agent, agent_grpc, env_agent, client = free_ports(7)
        cmd = [RAY, "start", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               f"--node-name={os.path.basename(temp_dir)}",
               f"--num-cpus={spec.num_cpus}", f"--num-gpus={spec.num_gpus}", f"--resources={json.dumps(spec.resources)}",
               f"--object-store-memory={OBJECT_STORE}", f"--node-manager-port={node_port}",
               f"--object-manager-port={object_port}", f"--metrics-export-port={metrics}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={env_agent}"]
        if spec.memory is not None:
            cmd.append(f"--memory={spec.memory}")
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={client}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--system-config={json.dumps(HEALTH)}"]
        else:
            cmd.append(f"--address={self.address}")
        os.makedirs(temp_dir, exist_ok=True)
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        node = Node(spec, temp_dir)
        self.nodes.append(node)
        return node, proc

    def live_nodes(self) -> dict[str, str]:
        """node name -> Ray node id of every live node, from Ray's state API (no driver needed)."""
        from ray.util.state import list_nodes

        return {n.node_name: n.node_id for n in list_nodes(address=self.dashboard_url, limit=1000, timeout=30)
                if n.state == "ALIVE"}

    def wait_registered(self, nodes: list[Node], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                alive = self.live_nodes()
            except Exception:  # the dashboard is still starting
                alive = {}
            for node in nodes:
                node.node_id = alive.get(node.name, node.node_id)
            if all(node.name in alive for node in nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {[n.name for n in nodes if n.name not in alive]} did not "
                                   f"register in {timeout_s:g}s")
            time.sleep(0.5)

    def wait_dead(self, node: Node, timeout_s: float = 60) -> float:
        """Seconds until Ray declared `node` dead (the GCS's health checks of its raylet failed)."""
        start = time.monotonic()
        while node.name in self.live_nodes():
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"node {node.name} still alive after {timeout_s:g}s")
            time.sleep(0.2)
        return time.monotonic() - start

    def kill(self, node: Node) -> None:
        """The node dies at once: SIGKILL its raylet, agents and workers (no handler runs, nothing is drained)."""
        stop_processes(node.temp_dir, signal.SIGKILL, grace_s=10)

    def node(self, name: str) -> Node:
        """The newest node of that spec (a restarted one, if it was restarted)."""
        return [n for n in self.nodes if n.spec.name == name][-1]

    def node_of(self, actor_id: str) -> Node | None:
        """Where an actor runs now, from Ray's state API (the dashboard's): the node Ray placed it on."""
        from ray.util.state import get_actor

        info = get_actor(actor_id, address=self.dashboard_url)
        if info is None or info.state != "ALIVE":
            return None
        return next((n for n in self.nodes if n.node_id == info.node_id), None)

    def save(self) -> Path:
        """ROOT/cluster.json: enough for another process (scripts/loopback_cluster.py) to add nodes."""
        state = {"address": self.address, "dashboard": self.dashboard_url, "root": self.root,
                 "nodes": [{**asdict(n.spec), "temp_dir": n.temp_dir, "node_id": n.node_id} for n in self.nodes]}
        path = Path(self.root) / "cluster.json"
        path.write_text(json.dumps(state, indent=1))
        return path

    @classmethod
    def load(cls, root: str) -> "LoopbackCluster":
        state = json.loads((Path(root) / "cluster.json").read_text())
        fields = ("name", "num_cpus", "num_gpus", "resources", "memory")
        specs = [NodeSpec(**{k: n[k] for k in fields}) for n in state["nodes"]]
        cluster = cls(specs, root=root)  # specs[0] is the head: it was launched first
        cluster.gcs_port = int(state["address"].rsplit(":", 1)[1])
        cluster.dashboard_port = int(state["dashboard"].rsplit(":", 1)[1])
        cluster.nodes = [Node(spec, n["temp_dir"], n["node_id"]) for spec, n in zip(specs, state["nodes"])]
        cluster.launches.update(spec.name for spec in specs)
        return cluster

    def stop(self) -> None:
        """Every process of every node (SIGTERM, then SIGKILL), then the temp dirs."""
        stop_processes(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
