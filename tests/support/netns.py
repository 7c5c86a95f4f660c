"""A second host on this machine: a network namespace joined to the host by a veth pair.

Inside it only its own loopback and its end of the veth exist (10.251.N.2/30), so a process in
it reaches the host's servers only at the host's end (10.251.N.1), where ``PortProxy``
forwarders carry each port to the server on 127.0.0.1. These addresses exist only on this
machine; nothing routes beyond it. ``run`` adds a private mount namespace whose /tmp and
checkout's ``.sim-pipeline/`` are empty tmpfs: the host's files there are out of sight.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from tests.support.tcp_proxy import PortProxy

SUBNET = "10.251"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def free_subnet() -> int:
    """N such that no address of this machine is in 10.251.N.0/24."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                          check=True).stdout
    for n in range(1, 255):
        if f" {SUBNET}.{n}." not in used:
            return n
    raise RuntimeError(f"every {SUBNET}.N.0/24 is in use on this machine")


class Namespace:
    """``ip netns`` NAME with the veth pair host_address <-> address, and the forwarders and
    processes started for it; ``close`` removes all of them."""

    def __init__(self) -> None:
        n, tag = free_subnet(), uuid.uuid4().hex[:6]
        self.name, self.veth = f"simw-{tag}", f"vsim{tag}"
        self.host_address, self.address = f"{SUBNET}.{n}.1", f"{SUBNET}.{n}.2"
        self.proxies: list[PortProxy] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        ip("netns", "add", self.name)
        try:
            ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns",
               self.name)
            ip("addr", "add", f"{self.host_address}/30", "dev", self.veth)
            ip("link", "set", self.veth, "up")
            for command in (["addr", "add", f"{self.address}/30", "dev", "eth0"],
                            ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
                ip("netns", "exec", self.name, "ip", *command)
        except subprocess.CalledProcessError:
            self.close()
            raise

    def forward(self, *ports: int) -> None:
        """Each loopback port, reachable from inside at host_address:port."""
        for port in ports:
            proxy = PortProxy(port, host=self.host_address, port=port)
            proxy.start()
            self.proxies.append(proxy)

    def run(self, command: Sequence[str], env: Mapping[str, str], hidden: Sequence[Path],
            log: IO[bytes]) -> subprocess.Popen[bytes]:
        """``command`` inside the namespace, with an empty tmpfs over /tmp and each of
        ``hidden``, in its own process group."""
        mounts = "; ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(p))}"
                           for p in ["/tmp", *hidden])
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.name, "unshare", "--mount", "--propagation", "private",
             "sh", "-ec", f'{mounts}; exec "$@"', "sh", *command],
            env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Stop the processes (SIGTERM, then SIGKILL to their groups), the forwarders, and
        delete the namespace and the veth pair."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for proxy in self.proxies:
            proxy.stop()
        # Anything still inside (a grandchild that left the group) dies with the namespace.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", self.veth)
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("netns", "del", self.name)
