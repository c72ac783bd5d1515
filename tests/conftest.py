"""Fixtures: real origins and real mitmdump processes on loopback (see harness.py)."""
from __future__ import annotations

import os
import subprocess

import pytest

from harness import Origin, Proxy, closed_port, hold_port, make_cert


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.close()


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_origin(cert):
    o = Origin(tls=cert)
    yield o
    o.close()


@pytest.fixture
def refused_port():
    """A loopback port that refuses connections for the whole test (see harness.closed_port)."""
    with closed_port() as (port, _):
        yield port


@pytest.fixture
def held_ports():
    """held_ports(port): the port an origin of the test just closed keeps refusing connections until
    the test ends (harness.hold_port)."""
    held = []
    yield lambda port: held.append(hold_port(port))
    for s in held:
        s.close()


@pytest.fixture
def start_proxy(tmp_path):
    """start_proxy(modes=("regular",), options={...}, script="addons/all.py") -> Proxy; stopped after the test."""
    started: list[Proxy] = []

    def start(modes=("regular",), **kw) -> Proxy:
        p = Proxy(tmp_path / f"proxy{len(started)}", modes=modes, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def proxy(start_proxy):
    """The whole suite as a regular forward proxy."""
    return start_proxy()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a folder on a tmpfs of that size ("64k", "1m"), so that a full disk is
    reached in a moment; unmounted after the test (needs root, as CI has)."""
    mounts = []

    def mount(size: str):
        assert os.geteuid() == 0, "mounting a small tmpfs needs root"
        mnt = tmp_path / f"small-{len(mounts)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        mounts.append(mnt)
        return mnt
    try:
        yield mount
    finally:
        for mnt in mounts:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
