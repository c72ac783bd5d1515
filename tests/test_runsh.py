"""run.sh on a fresh copy of the project: creates its venv, starts the proxy
on the given port, logs under var/, and, started as root, runs mitmproxy as
the unprivileged RELAIS_USER (Squid's cache_effective_user) that owns var/.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from harness import ROOT, curl, free_port, stop_group, wait_port


@pytest.fixture(scope="module")
def fresh_copy():
    # Under /tmp with open permissions: pytest's own tmp folders are private to root.
    folder = Path(tempfile.mkdtemp(prefix="relais-runsh-", dir="/tmp"))
    folder.chmod(0o755)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            dst = folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for d in folder.rglob("*"):
        if d.is_dir():
            d.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def start(folder: Path, port: int, env: dict[str, str], mode: str = "regular@127.0.0.1:{port}") -> subprocess.Popen:
    out = open(folder / "run.out", "wb")
    return subprocess.Popen(["./run.sh", "--mode", mode.format(port=port)], cwd=folder,
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_run_sh_starts_a_logging_proxy_as_the_unprivileged_user(fresh_copy, origin):
    assert os.geteuid() == 0, "this test checks the privilege drop, which happens only when started as root"
    port = free_port()
    proc = start(fresh_copy, port, {"RELAIS_USER": "nobody"})
    try:
        wait_port(port, timeout=300)  # the first start creates .venv and installs the project
        r = curl("-x", f"http://127.0.0.1:{port}", f"{origin.url}/through-run-sh")
        assert r.stdout == b"hello /through-run-sh"
        log = fresh_copy / "var" / "log" / "access.log"
        deadline = time.monotonic() + 10
        while "/through-run-sh" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "TCP_MISS/200" in log.read_text() and "/through-run-sh" in log.read_text()
        nobody = pwd.getpwnam("nobody").pw_uid
        assert uid_of(proc.pid) == nobody           # run.sh exec'd mitmdump as nobody
        assert log.stat().st_uid == nobody
        assert (fresh_copy / "var").stat().st_uid == nobody
        # mitmproxy's CA lives under var/ too, so a user can find it to trust it
        assert (fresh_copy / "var" / "mitmproxy" / "mitmproxy-ca-cert.pem").exists()
        # a large body streams through (stream_large_bodies): its first bytes come long before the
        # origin's last (600 KB at 3 KB per 0.1 s take 20 s), as from Squid
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", timeout=10) as client:
            with client.stream("GET", f"{origin.url}/slow/600000?rate=3000") as r:
                assert r.status_code == 200
                assert next(r.iter_raw(), b"")  # mitmproxy alone would hold the whole body first
    finally:
        stop_group(proc)
        print((fresh_copy / "run.out").read_text()[-3000:])


def test_a_mode_given_without_an_address_listens_on_relais_host_only(fresh_copy):
    """`./run.sh --mode socks5@1080` listens where the default mode does (RELAIS_HOST, 127.0.0.1),
    not on every interface as mitmproxy alone would."""
    port = free_port()
    proc = start(fresh_copy, port, {}, mode="socks5@{port}")
    try:
        wait_port(port, timeout=300)
        with socket.socket() as s:  # another loopback address: reachable only with a wildcard listener
            s.settimeout(5)
            assert s.connect_ex(("127.0.0.2", port)) != 0
    finally:
        stop_group(proc)
        print((fresh_copy / "run.out").read_text()[-3000:])


def test_run_sh_test_and_web_are_documented_commands():
    text = (ROOT / "run.sh").read_text()
    for word in ("test)", "web)", "bench)", "RELAIS_USER"):
        assert word in text
    readme = (ROOT / "README.md").read_text()
    assert "./run.sh test" in readme and "\n    ./run.sh\n" in readme
