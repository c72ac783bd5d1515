"""The benchmarks' load client: curl --parallel in its own process (keep-alive), so the
client never shares an interpreter with what is measured."""
import os
import subprocess
import time
from pathlib import Path

PARALLEL = 8  # concurrent transfers


def load(proxy_url: str, urls: list[str], tmp: Path) -> float:
    """Fetch every URL through the proxy; returns requests/s. Fails if any answer is not 200."""
    cfg = tmp / f"urls-{time.monotonic_ns()}.txt"
    cfg.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
    start = time.perf_counter()
    r = subprocess.run(["curl", "-s", "--parallel", "--parallel-max", str(PARALLEL), "-x", proxy_url,
                        "-w", "%{http_code}\\n", "-K", str(cfg)], capture_output=True, timeout=600)
    elapsed = time.perf_counter() - start
    codes = r.stdout.decode().split()
    bad = [c for c in codes if c != "200"]
    assert len(codes) == len(urls) and not bad, f"{len(bad)} failed requests: {bad[:5]}"
    return len(urls) / elapsed


def family(pid: int) -> list[int]:
    """pid and its child processes (the cache's disk writer)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return [pid, *kids]


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by pid and its child processes."""
    total = 0.0
    for p in family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_idle(pid: int, timeout: float = 30.0, busy: float = 0.05) -> None:
    """Wait until process `pid` and its children use under `busy` of a core, so that background work
    left over from one scenario (a cache's disk writes) is not charged to the next."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        before = cpu_seconds(pid)
        time.sleep(0.3)
        if cpu_seconds(pid) - before < busy * 0.3:
            return
