"""Throw-away network namespaces for transparent-mode tests (needs root).

Topology, all addresses inside namespaces this module creates:

    client (10.231.1.2) --veth-- router (10.231.1.1 | 10.231.2.1) --veth-- server (10.231.2.2)

The router forwards between the two, and iptables in the router redirects
the client's port 80/443 traffic to the proxy, as on a Squid interception
router.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

ECHO_PORT = 5222  # a raw TCP (chat-like) service, also redirected
CLIENT_IP, ROUTER_IN, ROUTER_OUT, SERVER_IP = "10.231.1.2", "10.231.1.1", "10.231.2.1", "10.231.2.2"


def sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


class Topology:
    def __init__(self, tag: str = "") -> None:
        tag = f"{os.getpid() % 10000}{tag}"  # interface names are at most 15 characters
        self.client, self.router, self.server = f"rlc{tag}", f"rlr{tag}", f"rls{tag}"
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def serve(self, port: int, *args: str) -> None:
        """Start origin_server.py on the server host (args: CERT KEY for TLS, or "echo")."""
        p = subprocess.Popen(self.ns(self.server, sys.executable, str(HERE / "origin_server.py"),
                                     SERVER_IP, str(port), *args),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(HERE))
        self.procs.append(p)
        if p.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"origin on {SERVER_IP}:{port} did not start")

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        """curl run on the client host."""
        return subprocess.run(self.ns(self.client, "curl", "-sS", "--max-time", "15", *args),
                              capture_output=True, timeout=30)

    def ns(self, name: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", name, *cmd]

    def up(self, proxy_port: int) -> None:
        for name in (self.client, self.router, self.server):
            sh("ip", "netns", "add", name)
            self.made.append(name)
            sh(*self.ns(name, "ip", "link", "set", "lo", "up"))
        tag = self.client[3:]
        a, b, c, d = f"rc{tag}", f"rr{tag}", f"rs{tag}", f"rq{tag}"
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", a, "netns", self.client)
        sh("ip", "link", "set", b, "netns", self.router)
        sh("ip", "link", "add", c, "type", "veth", "peer", "name", d)
        sh("ip", "link", "set", c, "netns", self.server)
        sh("ip", "link", "set", d, "netns", self.router)
        for name, dev, addr in ((self.client, a, CLIENT_IP), (self.router, b, ROUTER_IN),
                                (self.router, d, ROUTER_OUT), (self.server, c, SERVER_IP)):
            sh(*self.ns(name, "ip", "addr", "add", f"{addr}/24", "dev", dev))
            sh(*self.ns(name, "ip", "link", "set", dev, "up"))
        sh(*self.ns(self.client, "ip", "route", "add", "default", "via", ROUTER_IN))
        sh(*self.ns(self.server, "ip", "route", "add", "default", "via", ROUTER_OUT))
        sh(*self.ns(self.router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))
        for port in ("80", "443", str(ECHO_PORT)):
            # The rule Squid's docs give for an interception router.
            sh(*self.ns(self.router, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", b, "-p", "tcp",
                        "--dport", port, "-j", "REDIRECT", "--to-port", str(proxy_port)))

    def down(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs.clear()
        for name in self.made:
            subprocess.run(["ip", "netns", "pids", name], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()
