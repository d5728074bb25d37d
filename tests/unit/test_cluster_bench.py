"""The cluster bench's byte count (jobs/bench.py, --suite cluster): TCP bytes between processes of
different nodes, read from the kernel's tcp_info, each byte counted once where it arrived."""

import subprocess

from jobs import bench

SS = """ESTAB 0 0 127.0.0.1:6379 127.0.0.1:40000
\t cubic wscale:7,7 rto:204 bytes_sent:900 bytes_acked:900 bytes_received:500 segs_out:3
ESTAB 0 0 127.0.0.1:40000 127.0.0.1:6379
\t cubic wscale:7,7 rto:204 bytes_sent:500 bytes_acked:500 bytes_received:900 segs_out:3
ESTAB 0 0 [::ffff:192.0.2.2]:7000 [::ffff:192.0.2.2]:7001
\t cubic rto:204 bytes_received:70
ESTAB 0 0 127.0.0.1:5000 127.0.0.1:5001
ESTAB 0 0 127.0.0.1:5002 127.0.0.1:5003
\t cubic rto:204 segs_out:1
"""


def test_bytes_between_nodes_are_counted_once_per_direction_by_node_pair(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, SS, ""))
    after = bench.tcp_received()
    assert after == {(("127.0.0.1", 6379), ("127.0.0.1", 40000)): 500,
                     (("127.0.0.1", 40000), ("127.0.0.1", 6379)): 900,
                     (("192.0.2.2", 7000), ("192.0.2.2", 7001)): 70}  # sockets that received nothing: absent
    ends = {("127.0.0.1", 6379): "h", ("127.0.0.1", 40000): "g0", ("192.0.2.2", 7000): "b0", ("192.0.2.2", 7001): "b0"}
    before = {(("127.0.0.1", 6379), ("127.0.0.1", 40000)): 100}  # this socket existed; the other one is new
    assert bench.between_nodes(before, after, ends) == {"g0->h": 400, "h->g0": 900}  # b0 to b0: not between nodes
    assert bench.between_nodes(after, after, ends) == {"g0->h": 0, "h->g0": 0}
