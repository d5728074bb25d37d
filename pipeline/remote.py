"""The roles client: the engine's `roles.call` protocol, served by model-server actors.

`ivg.search` talks to its models through one method, `call({role: (method, args)}) -> {role: result}`.
`LocalRoles` (ivg/engine.py) answers it in-process; `RemoteRoles` answers it by sending each server
the calls for the roles it holds (one request per server, all servers at once) and waiting for all
of them. So the same search code drives local models and remote servers.

No wait is unbounded: a call that takes longer than `timeout_s` raises `GetTimeoutError`, which the
search actor treats like a lost server (the shard is retried), so a wedged actor cannot hang the run.
"""

from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class ServerRef:
    handle: object  # a ModelServer actor handle, or its actor name (looked up by RemoteRoles)
    roles: tuple[str, ...]  # the roles it serves (all of them when colocated)


class RemoteRoles:
    def __init__(self, servers: list[ServerRef], client: str, timeout_s: float):
        # by name: a handle in an actor's constructor arguments is an object-store reference, which
        # Ray warns about on every start of an actor that may restart
        servers = [ServerRef(ray.get_actor(s.handle), s.roles) if isinstance(s.handle, str) else s for s in servers]
        self.servers, self.client, self.timeout_s = servers, client, timeout_s
        self.server_of = {role: i for i, s in enumerate(servers) for role in s.roles}
        self.open_sessions: set[str] = set()  # sessions to drop if a search fails midway

    def call(self, calls: dict) -> dict:
        per_server: dict[int, dict] = {}
        for role, call in calls.items():
            per_server.setdefault(self.server_of[role], {})[role] = call
        methods = {method: args[0] for method, args in calls.values()}
        if "open" in methods:  # before sending: a server may open it even if another one fails
            self.open_sessions.add(methods["open"])
        refs = [self.servers[i].handle.call.remote(c, self.client) for i, c in per_server.items()]
        out = {}
        for result in ray.get(refs, timeout=self.timeout_s):
            out.update(result)
        if "close" in methods:
            self.open_sessions.discard(methods["close"])
        return out

    def drop_open_sessions(self) -> None:
        """After a failed search: free its sessions' caches on every server. Best effort: a server
        that is gone has lost them anyway, and this client's next `open` drops any left over."""
        sids, self.open_sessions = sorted(self.open_sessions), set()
        if sids:
            try:
                ray.get([s.handle.drop.remote(sids) for s in self.servers], timeout=self.timeout_s)
            except ray.exceptions.RayError:  # includes GetTimeoutError
                pass
