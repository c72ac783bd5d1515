"""Running a real Squid beside Relais in the differential tests (Debian's squid-openssl)."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

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
