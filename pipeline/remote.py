"""The roles client of placement `separate`: ivg/protocol.py's messages, answered by model-server actors.

`ivg.search` talks to its models through one method, `call({role: message}) -> {role: result}`.
`LocalRoles` (ivg/engine.py) answers it in-process; `RemoteRoles` sends each server the messages for
the roles it holds (one request per server, all servers at once) and waits for them.

Per token step the search sends the base a `Sample` (the newest token ids, one uniform per row) and
the token-wise value role a `Step`. The value server keeps its (rows, V) vector in the object store
and the base gets a reference to it inside its `Sample`: the base starts its own forward at once,
then fetches the vector from the value server (server to server), combines, samples and answers
O(rows) numbers. The search never holds the vector; `stats()` counts what it sends and receives.

No wait is unbounded: a call that takes longer than `timeout_s` raises `GetTimeoutError`, which the
search actor treats like a lost server (the shard is retried), so a wedged actor cannot hang the run.
"""

import pickle
from collections import Counter
from dataclasses import dataclass, replace

import ray

from ivg.protocol import PER_TOKEN, Close, Open, Sample


class SessionLost(RuntimeError):
    """The server does not hold the session (it was restarted, or the search was dropped)."""


@dataclass(frozen=True)
class ServerRef:
    handle: object  # a ModelServer actor handle, or its actor name (looked up by RemoteRoles)
    roles: tuple[str, ...]  # the roles it serves (all of them when colocated)


def payload_bytes(obj) -> int:
    """Serialized size of a message or result (an object reference counts as its id)."""
    if isinstance(obj, ray.ObjectRef):
        return len(obj.binary())
    if isinstance(obj, dict):
        return sum(payload_bytes(v) + len(pickle.dumps(k)) for k, v in obj.items())
    if isinstance(obj, Sample) and isinstance(obj.value, ray.ObjectRef):
        return len(pickle.dumps(replace(obj, value=None))) + payload_bytes(obj.value)
    return len(pickle.dumps(obj))


class RemoteRoles:
    def __init__(self, servers: list[ServerRef], client: str, timeout_s: float):
        # by name: a handle in an actor's constructor arguments is an object-store reference, which
        # Ray warns about on every start of an actor that may restart
        servers = [ServerRef(ray.get_actor(s.handle), s.roles) if isinstance(s.handle, str) else s for s in servers]
        self.servers, self.client, self.timeout_s = servers, client, timeout_s
        self.server_of = {role: i for i, s in enumerate(servers) for role in s.roles}
        self.open_sessions: set[str] = set()  # sessions to drop if a search fails midway
        self.counts = Counter()  # per-token traffic: steps, rows, bytes sent and received

    def call(self, messages: dict) -> dict:
        per_server: dict[int, dict] = {}
        for role, m in messages.items():
            per_server.setdefault(self.server_of[role], {})[role] = m
        for m in messages.values():
            if isinstance(m, Open):  # before sending: a server may open it even if another one fails
                self.open_sessions.add(m.sid)
        # a Sample whose value lives on another server gets that server's answer as a reference
        sample = next(((r, m) for r, m in messages.items() if isinstance(m, Sample) and m.value_from), None)
        sent, refs = [], []
        if sample and self.server_of[sample[1].value_from] != self.server_of[sample[0]]:
            source = self.server_of[sample[1].value_from]
            sent.append(per_server.pop(source))
            refs.append(self.servers[source].handle.call.remote(sent[-1], self.client))
            base = self.server_of[sample[0]]
            per_server[base] = {**per_server[base], sample[0]: replace(sample[1], value=refs[-1])}
        for i, msgs in per_server.items():
            sent.append(msgs)
            refs.append(self.servers[i].handle.call.remote(msgs, self.client))
        results = ray.get(refs, timeout=self.timeout_s)
        out = {}
        for result in results:
            out.update(result)
        if sample:
            out[sample[1].value_from] = None  # a reference to the vector the base consumed
        per_token = [m for m in messages.values() if isinstance(m, PER_TOKEN)]
        if per_token:
            self.counts["token_steps"] += 1
            self.counts["rows"] += len(per_token[0].tokens)
            self.counts["bytes_sent"] += sum(map(payload_bytes, sent))
            self.counts["bytes_received"] += sum(map(payload_bytes, results))
        for m in messages.values():
            if isinstance(m, Close):
                self.open_sessions.discard(m.sid)
        return out

    def stats(self) -> dict:
        c = self.counts
        return {**c, "bytes_received_per_row_step": c["bytes_received"] / max(c["rows"], 1),
                "bytes_sent_per_row_step": c["bytes_sent"] / max(c["rows"], 1)}

    def drop_open_sessions(self) -> None:
        """After a failed search: free its sessions' caches on every server. Best effort: a server
        that is gone has lost them anyway, and this client's next `open` drops any left over."""
        sids, self.open_sessions = sorted(self.open_sessions), set()
        if sids:
            try:
                ray.get([s.handle.drop.remote(sids) for s in self.servers], timeout=self.timeout_s)
            except ray.exceptions.RayError:  # includes GetTimeoutError
                pass
