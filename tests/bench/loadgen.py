"""The benchmarks' load client: curl --parallel in its own process (keep-alive), so the
client never shares an interpreter with what is measured."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import family, free_port, wait_port  # noqa: E402

PARALLEL = 8  # concurrent transfers


class FastOrigin:
    """tests/bench/fast_origin.py in its own process (the test Origin is too slow to measure a proxy)."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "fast_origin.py"),
                                      str(self.port)])
        try:
            wait_port(self.port)
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(5)


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


# --- paired runs: two proxies at once on one core -------------------------------------------------
#
# On a shared 2-core VM the speed of the machine itself drifts by 20 % from one minute to the next, so
# two scenarios run one after the other compare the machine as much as the proxies. A paired run puts
# both proxies on core 0 at the same time (their load clients and the origin on core 1): whatever slows
# the core slows both alike, and the ratio of the requests each completes in the same seconds is the
# ratio of their speeds.

PROXY_CORE, CLIENT_CORE = "0", "1"


def can_pin() -> bool:
    return (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None and shutil.which("stdbuf") is not None


def pin(pid: int, core: str) -> None:
    """Pin a process, its threads and its child processes (the cache's disk writer) to `core`."""
    for p in family(pid):
        subprocess.run(["taskset", "-a", "-p", "-c", core, str(p)], capture_output=True, check=False)


def _start(proxy_url: str, urls: list[str], tmp: Path) -> tuple[subprocess.Popen, Path]:
    stem = tmp / f"paired-{time.monotonic_ns()}"
    cfg, out = stem.with_suffix(".urls"), stem.with_suffix(".codes")
    cfg.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
    # stdbuf: one status line per answer as it completes, so that what is counted at the end is exact;
    # into a file, which never fills up as a pipe would
    with open(out, "wb") as f:
        proc = subprocess.Popen(["taskset", "-c", CLIENT_CORE, "stdbuf", "-oL", "curl", "-s", "--parallel",
                                 "--parallel-max", str(PARALLEL), "-x", proxy_url, "-w", "%{http_code}\\n",
                                 "-K", str(cfg)], stdout=f, stderr=subprocess.DEVNULL)
    return proc, out


def paired(a: tuple[str, list[str]], b: tuple[str, list[str]], tmp: Path, seconds: float,
           b_first: bool) -> float:
    """Load proxies a and b (each (proxy url, urls)) at the same time for `seconds`; returns the
    requests b completed divided by those a completed. The urls lists must outlast the run."""
    first, second = (b, a) if b_first else (a, b)
    started = []
    try:
        started.append(_start(first[0], first[1], tmp))
        started.append(_start(second[0], second[1], tmp))
        time.sleep(seconds)
    finally:
        for p, _ in started:
            # SIGTERM: a shell runs a background job with SIGINT ignored (`./run.sh bench &`),
            # and curl would then go on to the end of its list
            p.send_signal(signal.SIGTERM)
        for p, _ in started:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if b_first:
        started.reverse()  # started[0] is a's, started[1] is b's
    counts = []
    for _, out in started:
        codes = out.read_text().split()
        bad = [c for c in codes if c not in ("200", "000")]  # 000: a transfer the interruption cut
        assert "200" in codes and not bad, f"{len(bad)} failed requests in a paired run: {bad[:5]}"
        counts.append(codes.count("200"))
    for n, (_, urls) in zip(counts, (a, b)):
        assert n < len(urls), f"a load client finished all {len(urls)} URLs: the run did not stop after {seconds} s"
    return counts[1] / counts[0]
