"""Running a real Squid beside Relais in the differential tests (Debian's squid-openssl)."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

from harness import free_port, stop_group, wait_port

SQUID = shutil.which("squid") or "/usr/sbin/squid"


def wait_squid(squid: subprocess.Popen, tmp: Path, port: int, timeout: float = 30.0) -> None:
    """Until Squid's cache.log says it accepts connections on the port: something else may listen there
    (then Squid cannot bind it, and exits)."""
    end = time.monotonic() + timeout
    while True:
        try:
            log = (tmp / "cache.log").read_text(errors="replace")
        except FileNotFoundError:
            log = ""
        if re.search(rf"Accepting HTTP Socket connections at \S+ local=127\.0\.0\.1:{port} ", log):
            return
        if squid.poll() is not None:
            raise RuntimeError(f"squid exited {squid.returncode}:\n{log}")
        if time.monotonic() >= end:
            raise TimeoutError(f"squid not listening on {port} after {timeout}s:\n{log}")
        time.sleep(0.1)


def start_squid(tmp: Path, conf_text: str, port: int) -> subprocess.Popen:
    """Squid with conf_text as tmp/squid.conf, once it listens on `port`. Squid runs as the proxy user,
    which gets the folder and its files. A Squid that does not start is stopped and the error goes up
    ("address already in use" when another process took the port first: the caller may try another)."""
    (tmp / "squid.conf").write_text(conf_text)
    (tmp / "cache.log").unlink(missing_ok=True)
    uid = pwd.getpwnam("proxy").pw_uid
    for f in (tmp, *tmp.iterdir()):
        os.chown(f, uid, -1)
    squid = subprocess.Popen([SQUID, "-N", "-f", str(tmp / "squid.conf")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_squid(squid, tmp, port)
        wait_port(port, timeout=30)
    except Exception:
        stop_group(squid)
        raise
    return squid


def common_conf(tmp: Path) -> str:
    """The squid.conf lines every differential test shares: Squid's files in tmp, run as the proxy
    user, quick to stop, no pinger or netdb, one log file, and the name it shows (relais-diff)."""
    return f"""
pid_filename {tmp}/squid.pid
cache_log {tmp}/cache.log
access_log stdio:{tmp}/access.log
cache_effective_user proxy
coredump_dir {tmp}
dns_nameservers 127.0.0.1
shutdown_lifetime 0 seconds
visible_hostname relais-diff
pinger_enable off
netdb_filename none
logfile_rotate 0
"""


def start_squid_on_free_port(tmp: Path, conf_for) -> tuple[subprocess.Popen, int]:
    """(Squid, its port): start_squid with conf_for(port) on a free port, and on another one when a
    process takes the port before Squid binds it (three tries)."""
    for attempt in range(3):
        port = free_port()
        try:
            return start_squid(tmp, conf_for(port), port), port
        except Exception as e:
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    raise AssertionError("unreachable")
