"""Cache benchmark (./run.sh bench): requests/s through mitmdump on loopback, in one invocation.

Scenarios, each against a fresh mitmdump:
  bare      mitmdump without addons relaying to the local origin
  ceiling   a trivial addon answering every request in requestheaders (tests/bench/ceiling_addon.py)
  miss      addons/all.py, every request a cacheable miss (stored)
  mem hit   addons/all.py, every request a TCP_MEM_HIT
  disk hit  addons/all.py with cache_mem 0, every request a TCP_HIT
and the peak RSS of mitmdump while filling the cache with 10x cache_mem of objects.

The load client is curl --parallel in its own process (keep-alive, 8 concurrent transfers).
Ratios are printed against the targets of issue 3; nothing is asserted on timing.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadgen import PARALLEL, load, wait_idle  # noqa: E402
from harness import Proxy, free_port, wait_port  # noqa: E402

HERE = Path(__file__).resolve().parent


class FastOrigin:
    """tests/bench/fast_origin.py in its own process (the test Origin is too slow to measure a proxy)."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fast_origin.py"), str(self.port)])
        wait_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(5)

N = 3000            # requests per throughput scenario
OBJECTS = 100       # distinct URLs for the hit scenarios
SIZE = 1000         # body bytes
CACHE_MEM_MB = 8


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def count_codes(proxy: Proxy) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in proxy.log_lines(1, timeout=2):
        code = line.split()[3].split("/")[0]
        out[code] = out.get(code, 0) + 1
    return out


def test_bench_cache(tmp_path):
    origin = FastOrigin()
    results: dict[str, float] = {}
    notes: list[str] = []
    cc = "h.Cache-Control=max-age=3600"
    try:
        relay_urls = [f"{origin.url}/size/{SIZE}?n={i % OBJECTS}" for i in range(N)]

        for name, script in (("bare relay", None), ("ceiling", "tests/bench/ceiling_addon.py"),
                             ("ceiling in all.py", "tests/bench/pipeline_ceiling.py")):
            p = Proxy(tmp_path / name.replace(" ", "-"), script=script)
            try:
                load(p.url, relay_urls[:200], tmp_path)  # warm-up
                results[name] = load(p.url, relay_urls, tmp_path)
            finally:
                p.stop()

        p = Proxy(tmp_path / "all", options={"cache_dir": str(tmp_path / "all" / "cache"),
                                               "cache_mem": f"{CACHE_MEM_MB} MB"})
        try:
            load(p.url, [f"{origin.url}/size/{SIZE}?warm={i}&{cc}" for i in range(200)], tmp_path)
            results["all.py misses"] = load(p.url, [f"{origin.url}/size/{SIZE}?miss={i}&{cc}" for i in range(N)],
                                             tmp_path)
            hot = [f"{origin.url}/size/{SIZE}?hot={i}&{cc}" for i in range(OBJECTS)]
            load(p.url, hot, tmp_path)
            wait_idle(p.proc.pid)  # the misses' disk writes are not the hits' cost
            results["all.py mem hits"] = load(p.url, [hot[i % OBJECTS] for i in range(N)], tmp_path)
            codes = count_codes(p)
            notes.append(f"all.py log codes: {codes}")
        finally:
            p.stop()

        p = Proxy(tmp_path / "disk", options={"cache_dir": str(tmp_path / "disk" / "cache"), "cache_mem": "0"})
        try:
            hot = [f"{origin.url}/size/{SIZE}?disk={i}&{cc}" for i in range(OBJECTS)]
            load(p.url, hot, tmp_path)
            wait_idle(p.proc.pid)  # the background writer puts them on disk
            load(p.url, hot, tmp_path)
            wait_idle(p.proc.pid)
            results["all.py disk hits"] = load(p.url, [hot[i % OBJECTS] for i in range(N)], tmp_path)
            codes = count_codes(p)
            notes.append(f"disk run log codes: {codes}")
        finally:
            p.stop()

        # peak RSS while filling 10x cache_mem (100 KB objects, all cacheable)
        p = Proxy(tmp_path / "rss", options={"cache_dir": str(tmp_path / "rss" / "cache"),
                                               "cache_mem": f"{CACHE_MEM_MB} MB"})
        try:
            obj = 100 * 1024
            n = 10 * CACHE_MEM_MB * 1024 * 1024 // obj
            load(p.url, [f"{origin.url}/size/{obj}?fill={i}&{cc}" for i in range(n)], tmp_path)
            rss = peak_rss_mb(p.proc.pid)
        finally:
            p.stop()
    finally:
        origin.close()

    bare, ceiling = results["bare relay"], results["ceiling"]
    print("\n=== cache benchmark (requests/s, loopback, curl --parallel-max %d) ===" % PARALLEL)
    for name, rps in results.items():
        print(f"  {name:18s} {rps:8.0f} req/s")
    print(f"  ceiling / bare relay        {ceiling / bare:5.2f}x")
    rows = [
        ("mem hits / ceiling", results["all.py mem hits"] / ceiling, 0.95),
        ("disk hits / ceiling", results["all.py disk hits"] / ceiling, 0.85),
        ("misses / bare relay", results["all.py misses"] / bare, 0.85),
    ]
    for name, ratio, target in rows:
        print(f"  {name:26s} {ratio:5.2f}x  (target >= {target}x)  {'ok' if ratio >= target else 'BELOW TARGET'}")
    limit = CACHE_MEM_MB + 150
    print(f"  peak RSS filling {10 * CACHE_MEM_MB} MB with cache_mem {CACHE_MEM_MB} MB: {rss:.0f} MB "
          f"(target < {limit} MB)  {'ok' if rss < limit else 'ABOVE TARGET'}")
    pipe = results["ceiling in all.py"]
    print("  the same hits against the ceiling inside the all.py pipeline (the other addons' cost removed):")
    print(f"  mem hits / pipeline ceiling  {results['all.py mem hits'] / pipe:5.2f}x   "
          f"disk hits / pipeline ceiling {results['all.py disk hits'] / pipe:5.2f}x")
    for n in notes:
        print("  " + n)
    assert all(v > 0 for v in results.values())
