"""Ray processes started by tests, found and stopped by their own temp dir (never `ray stop`, which
stops every Ray cluster on the machine, other people's too)."""

import signal
import socket

import psutil


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def processes_of(temp_dir: str) -> list[psutil.Process]:
    """Every process of the cluster rooted at temp_dir: those naming it, and their descendants."""
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
            roots.append(p)
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return [p for p in found.values() if _alive(p)]


def _alive(p: psutil.Process) -> bool:
    """Running: not gone, and not a zombie (dead, only waiting for a parent that may never reap it)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_cluster(temp_dir: str) -> None:
    procs = processes_of(temp_dir)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
