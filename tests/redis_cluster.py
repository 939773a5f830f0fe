"""A private Redis Cluster for tests: 3 masters and 3 replicas started on free
ports in a temporary directory, each node a ``RedisServer`` that a test may
kill, pause or restart, and the slot map built with ``redis-cli --cluster``."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from tests.redis_server import RedisServer, free_port

#: Milliseconds before a silent master is failed over: short, so tests wait little.
NODE_TIMEOUT_MS = 1000


class RedisCluster:
    """Six ``redis-server --cluster-enabled yes`` nodes; the first three start as masters."""

    def __init__(
        self, *, masters: int = 3, replicas: int = 1, appendonly: bool = True, addresses: Sequence[str] = (),
        tls: Path | None = None,
    ) -> None:
        """``tls``: a directory with ``server.crt``, ``server.key`` and ``ca.crt``:
        each node also listens with TLS (on ``tls_ports``), and talks TLS to
        the other nodes (bus and replication); ``url`` is then ``rediss+cluster://``."""
        self.nodes = [
            RedisServer(appendonly=appendonly, extra=(
                "--cluster-enabled", "yes",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # A node whose replica is gone keeps serving its slots.
                "--cluster-require-full-coverage", "no",
                "--cluster-allow-replica-migration", "no",
                # A replica syncs at once (the default waits 5 s for more replicas).
                "--repl-diskless-sync-delay", "0",
            ))
            for _ in range(masters * (1 + replicas))
        ]
        for node in self.nodes:
            # The bus port on a free port of its own (port + 10000 may be taken or too high).
            node.extra = (*node.extra, "--cluster-config-file", str(node.dir / "nodes.conf"),
                          "--cluster-port", str(free_port()))
        #: Where clients and the other nodes reach each node: 127.0.0.1, or one
        #: address each (a node then listens on it and on 127.0.0.1, and
        #: announces it), so that a test can cut a client off from one node.
        self.hosts = list(addresses) or ["127.0.0.1"] * len(self.nodes)
        if addresses:
            if len(addresses) != len(self.nodes):
                raise ValueError(f"{len(self.nodes)} nodes need as many addresses, not {len(addresses)}")
            for node, address in zip(self.nodes, addresses, strict=True):
                # Protected mode would refuse clients on the address (no password is set).
                node.extra = (*node.extra, "--bind", address, "127.0.0.1", "--cluster-announce-ip", address,
                              "--protected-mode", "no")
        self.tls_ports: dict[int, int] = {}
        if tls is not None:
            for node in self.nodes:
                self.tls_ports[node.port] = free_port()
                node.extra = (*node.extra, "--tls-port", str(self.tls_ports[node.port]),
                              "--tls-cert-file", str(tls / "server.crt"), "--tls-key-file", str(tls / "server.key"),
                              "--tls-ca-cert-file", str(tls / "ca.crt"), "--tls-auth-clients", "no",
                              "--tls-cluster", "yes", "--tls-replication", "yes")
        self.masters = masters
        self.replicas = replicas
        self._clients: dict[int, redis.Redis] = {}

    @property
    def url(self) -> str:
        if self.tls_ports:
            hosts = ",".join(f"{self.host(n.port)}:{self.tls_ports[n.port]}" for n in self.nodes[: self.masters])
            return f"rediss+cluster://{hosts}/"
        hosts = ",".join(f"{self.host(node.port)}:{node.port}" for node in self.nodes[: self.masters])
        return f"redis+cluster://{hosts}/"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        if self.masters == 1 and self.replicas == 0:
            # redis-cli refuses a one-node cluster: give the node every slot itself.
            self.nodes[0].command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        else:
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"{self.host(n.port)}:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node reports ``cluster_state:ok`` and every
        replica is in sync with its master (only such a replica can take over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
            try:
                ok = all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in live)
                roles = [n.command("INFO", "replication") for n in live]
                synced = sum(b"role:slave" in r and b"master_link_status:up" in r for r in roles)
                if ok and synced == sum(b"role:slave" in r for r in roles) and (
                        synced >= self.masters * self.replicas or len(live) < len(self.nodes)):
                    return
            except subprocess.SubprocessError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the test cluster did not reach cluster_state:ok")

    def master_ports(self) -> list[int]:
        """Ports of the nodes that are masters now (failovers change them)."""
        ports = []
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                if b"role:master" in node.command("INFO", "replication"):
                    ports.append(node.port)
            except subprocess.SubprocessError:
                continue
        return ports

    def host(self, port: int) -> str:
        """The address the node on ``port`` is reached at."""
        return self.hosts[next(i for i, n in enumerate(self.nodes) if n.port == port)]

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def node_id(self, port: int) -> str:
        return self.node(port).command("CLUSTER", "MYID").decode().strip()

    def owner(self, slot: int) -> int:
        """The port of the master serving ``slot`` now."""
        for port in self.master_ports():
            for line in self.node(port).command("CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for span in fields[8:]:
                    if span.startswith("["):
                        continue
                    low, _, high = span.partition("-")
                    if int(low) <= slot <= int(high or low):
                        return port
        raise LookupError(f"no master serves slot {slot}")

    def migrate(self, slot: int, to_port: int, *, pause: float = 0.05) -> int:
        """Move ``slot`` to the master on ``to_port`` as ``redis-cli --cluster
        reshard`` does (IMPORTING, MIGRATING, MIGRATE key by key, then NODE
        everywhere), one key at a time with ``pause`` between, so that clients
        meet the slot half moved. Returns how many keys moved."""
        source, target = self.node(self.owner(slot)), self.node(to_port)
        source_id, target_id = self.node_id(source.port), self.node_id(to_port)
        target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        moved = 0
        while True:
            keys = source.command("--raw", "CLUSTER", "GETKEYSINSLOT", str(slot), "1").decode().split()
            if not keys:
                break
            reply = source.command("MIGRATE", "127.0.0.1", str(to_port), "", "0", "5000", "KEYS", *keys)
            if not reply.startswith(b"OK"):
                raise RuntimeError(f"MIGRATE of {keys} failed: {reply!r}")
            moved += 1
            time.sleep(pause)
        for port in self.master_ports():
            self.node(port).command("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        return moved

    def flush(self) -> None:
        """Empty every master (replicas follow), over connections kept
        between calls: a test session flushes before every test."""
        if not self._clients:
            self._clients = {port: redis.Redis(port=port) for port in self.master_ports()}
        try:
            for client in self._clients.values():
                client.flushall()
        except redis.RedisError:  # a failover moved the masters: look again
            for client in self._clients.values():
                client.close()
            self._clients = {}
            self.flush()

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        for node in self.nodes:
            node.stop()
