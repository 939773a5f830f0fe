"""A network namespace for one test: a worker inside it reaches the Redis
Cluster nodes over a veth pair, and a route per node lets a test cut it off
from one of them (``ip route add blackhole``: packets dropped silently, as a
broken switch or a firewall would) and heal it again.

Only what this module creates is touched: the namespace and the veth pair,
named after the process id so that parallel runs do not clash, and removed
by ``close`` (the namespace's deletion takes its end of the pair with it).
Needs root and iproute2 (``ip netns``); ``unavailable`` says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from itertools import count

_serial = count()


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(("netns", "exec", netns, "ip") if netns else ()), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or ``None`` when they can."""
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"choreo-probe-{os.getpid()}-{next(_serial)}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if done.returncode:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


class NetworkNamespace:
    """A namespace joined to the host by a veth pair on a private /24.

    The host end has one address per ``hosts`` entry (``.1``, ``.2``, ...),
    for servers to bind to; the namespace end has ``.200``. A process started
    with ``command`` runs inside the namespace and reaches only those
    addresses (and its own loopback).
    """

    def __init__(self, hosts: int) -> None:
        serial = next(_serial)
        pid = os.getpid()
        self.name = f"choreo-{pid}-{serial}"
        # Interface names are at most 15 characters.
        self._host_end, self._ns_end = f"cho{pid % 10**7}{serial % 10}h", f"cho{pid % 10**7}{serial % 10}n"
        # A /24 of 10/8 picked from the pid, so parallel runs use different ones.
        net = (pid * 7 + serial) % 65_000
        self._prefix = f"10.{net // 256 % 256}.{net % 256}"
        self.addresses = [f"{self._prefix}.{i + 1}" for i in range(hosts)]
        self._created = False

    def open(self) -> NetworkNamespace:
        _ip("netns", "add", self.name)
        self._created = True
        _ip("link", "add", self._host_end, "type", "veth", "peer", "name", self._ns_end)
        _ip("link", "set", self._ns_end, "netns", self.name)
        for address in self.addresses:
            _ip("addr", "add", f"{address}/24", "dev", self._host_end)
        _ip("link", "set", self._host_end, "up")
        _ip("addr", "add", f"{self._prefix}.200/24", "dev", self._ns_end, netns=self.name)
        _ip("link", "set", self._ns_end, "up", netns=self.name)
        _ip("link", "set", "lo", "up", netns=self.name)
        return self

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` run inside the namespace (``ip netns exec`` execs them: same pid)."""
        return ["ip", "netns", "exec", self.name, *args]

    def cut(self, address: str) -> None:
        """Drop every packet from the namespace to ``address``."""
        _ip("route", "add", "blackhole", f"{address}/32", netns=self.name)

    def heal(self, address: str) -> None:
        _ip("route", "del", "blackhole", f"{address}/32", netns=self.name)

    def close(self) -> None:
        """Delete the namespace (and with it the veth pair); safe to call twice."""
        if self._created:
            self._created = False
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            # Normally gone with the namespace; a failed open may have left the host end alone.
            subprocess.run(["ip", "link", "del", self._host_end], capture_output=True, timeout=10)
