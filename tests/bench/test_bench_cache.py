"""Cache benchmark (./run.sh bench): requests/s through mitmdump on loopback, in one invocation.

Scenarios, each in its own mitmdump started once:
  bare      mitmdump without addons relaying to the local origin
  ceiling   a trivial addon answering every request in requestheaders (tests/bench/ceiling_addon.py)
  miss      addons/all.py, every request a cacheable miss (stored)
  mem hit   addons/all.py, every request a TCP_MEM_HIT
  disk hit  addons/all.py with cache_mem 0, every request a TCP_HIT
and the peak RSS of mitmdump (with its disk writer process) while filling the cache with 10x
cache_mem of objects, 100 KB ones and 1 KB ones.
The scenarios run in interleaved rounds (bare, ceiling, ..., bare, ceiling, ...) and each
reports its median, so that a noisy moment of the machine does not land on one scenario.

The load client is curl --parallel in its own process (keep-alive, 8 concurrent transfers).

This machine's speed drifts by up to 20 % between one minute and the next, more than the
differences measured. So the ratios judged against the targets of issue 3 come from paired
runs (tests/bench/loadgen.py): the two proxies compared run at the same time on one core,
their clients and the origin on the other, and each ratio is the median over runs in both
starting orders. The sequential figures are printed too. Nothing is asserted on timing.
In the paired ratios on misses, the baseline relays the same kind of requests as the misses:
each URL new, with the same query and response fields (mitmproxy parses a URL it has seen
before faster, from urllib's cache, and the sequential relay runs repeat 100 URLs).
Each proxy is a session of its own (tests/harness.py), so the kernel's autogroup scheduler
(Linux with kernel.sched_autogroup_enabled=1 and the processes in the root cpu cgroup, as
on these machines) shares the core equally between the two, whatever the threads of each:
the ratio compares the CPU each spends per request. (In one session the proxy with more
threads gets a larger share: all.py on misses measured 0.84 against the bare relay that
way, 0.80 this way.) The cache's disk writer is a session of its own too, pinned to the
proxies' core with its proxy, the stricter setting (in production it may run on another
core). Measured with paired runs: all.py on misses is 2 to 5 % slower with its disk tier
than with cache_dir none, and moving the writer to the other core changed that by 1 %
(session 11 measured it as fast there; session 13, on a slower machine, did not).

Two more paired ratios say what the cache itself costs, every other Relais addon running
on both sides: all.py on misses against all.py without the cache
(tests/bench/pipeline_subset.py without Cache), and memory hits against the trivial answer put where the
cache sits (tests/bench/pipeline_ceiling.py).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadgen import PARALLEL, CLIENT_CORE, PROXY_CORE, FastOrigin, can_pin, load, paired, pin, wait_idle  # noqa: E402
from harness import ROOT, Proxy, peak_rss_mb  # noqa: E402

N = 3000            # requests per throughput scenario
OBJECTS = 100       # distinct URLs for the hit scenarios
SIZE = 1000         # body bytes
CACHE_MEM_MB = 8
RSS_OBJECTS = (100 * 1024, 1024)  # object sizes of the RSS scenarios (bytes)


def count_codes(proxy: Proxy) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in proxy.log_lines(1, timeout=2):
        code = line.split()[3].split("/")[0]
        out[code] = out.get(code, 0) + 1
    return out


ROUNDS = 3          # each scenario runs once per round, rounds interleaved; the median is reported
PAIR_ROUNDS = 4     # paired runs per ratio, half of them with each proxy started first
PAIR_SECONDS = 6


def test_bench_cache(tmp_path):
    origin = FastOrigin()
    runs: dict[str, list[float]] = {}
    pairs: dict[str, list[float]] = {}
    notes: list[str] = []
    cc = "h.Cache-Control=max-age=3600"
    proxies: dict[str, Proxy] = {}
    rss: dict[int, float] = {}
    try:
        relay_urls = [f"{origin.url}/size/{SIZE}?n={i % OBJECTS}" for i in range(N)]
        policy = {"policy": str(ROOT / "tests" / "policies" / "test.yaml")}  # all.py's, in the harness
        for name, script, options, env in (
                ("bare relay", None, None, None), ("ceiling", "tests/bench/ceiling_addon.py", None, None),
                ("ceiling in all.py", "tests/bench/pipeline_ceiling.py", policy, None),
                ("all.py without cache", "tests/bench/pipeline_subset.py", policy, {"RELAIS_BENCH_WITHOUT": "Cache"})):
            proxies[name] = Proxy(tmp_path / name.replace(" ", "-"), script=script, options=options, env=env)
            load(proxies[name].url, relay_urls[:200], tmp_path)  # warm-up
        proxies["all"] = Proxy(tmp_path / "all", options={"cache_dir": str(tmp_path / "all" / "cache"),
                                                           "cache_mem": f"{CACHE_MEM_MB} MB"})
        load(proxies["all"].url, [f"{origin.url}/size/{SIZE}?warm={i}&{cc}" for i in range(200)], tmp_path)
        hot = [f"{origin.url}/size/{SIZE}?hot={i}&{cc}" for i in range(OBJECTS)]
        load(proxies["all"].url, hot, tmp_path)
        proxies["disk"] = Proxy(tmp_path / "disk", options={"cache_dir": str(tmp_path / "disk" / "cache"),
                                                             "cache_mem": "0"})
        cold = [f"{origin.url}/size/{SIZE}?disk={i}&{cc}" for i in range(OBJECTS)]
        load(proxies["disk"].url, cold, tmp_path)
        wait_idle(proxies["disk"].proc.pid)  # the background writer puts them on disk

        def scenario(name: str, proxy: Proxy, urls: list[str]) -> None:
            wait_idle(proxy.proc.pid)  # leftover background work (disk writes) is not this run's cost
            runs.setdefault(name, []).append(load(proxy.url, urls, tmp_path))

        for r in range(ROUNDS):
            for name in ("bare relay", "ceiling", "ceiling in all.py", "all.py without cache"):
                scenario(name, proxies[name], relay_urls)
            scenario("all.py misses", proxies["all"],
                     [f"{origin.url}/size/{SIZE}?miss={i}&round={r}&{cc}" for i in range(N)])
            scenario("all.py mem hits", proxies["all"], [hot[i % OBJECTS] for i in range(N)])
            scenario("all.py disk hits", proxies["disk"], [cold[i % OBJECTS] for i in range(N)])
        if can_pin():
            pin(origin.proc.pid, CLIENT_CORE)
            for p in proxies.values():
                pin(p.proc.pid, PROXY_CORE)
            many = 8 * N  # more than a run of PAIR_SECONDS can use (4000 req/s)
            relay = [relay_urls[i % len(relay_urls)] for i in range(many)]
            for r in range(PAIR_ROUNDS):
                b_first = r % 2 == 1  # each order as often: the one started first may have an edge
                misses = [f"{origin.url}/size/{SIZE}?pmiss={i}&round={r}&{cc}" for i in range(many)]
                hits = [hot[i % OBJECTS] for i in range(many)]
                # the baselines of misses get the same kind of requests as the misses: new URLs, each once
                # (mitmproxy parses a URL it has seen before faster: its urllib cache; 2 % here)
                fresh = [u.replace("pmiss=", "pbare=") for u in misses]
                for name, a, b in (
                        ("misses / bare relay", ("bare relay", fresh), ("all", misses)),
                        ("mem hits / ceiling", ("ceiling", relay), ("all", hits)),
                        ("disk hits / ceiling", ("ceiling", relay), ("disk", [cold[i % OBJECTS] for i in range(many)])),
                        ("misses / all.py without cache",
                         ("all.py without cache", [u.replace("pmiss=", "dbase=") for u in misses]),
                         ("all", [u.replace("pmiss=", "dmiss=") for u in misses])),
                        ("mem hits / ceiling in all.py", ("ceiling in all.py", relay), ("all", hits))):
                    if name.startswith("mem"):  # the misses before may have pushed hot objects to disk
                        load(proxies["all"].url, hot, tmp_path)
                    for p in (proxies[a[0]], proxies[b[0]]):
                        wait_idle(p.proc.pid)
                    pairs.setdefault(name, []).append(paired((proxies[a[0]].url, a[1]), (proxies[b[0]].url, b[1]),
                                                             tmp_path, PAIR_SECONDS, b_first))
        notes.append(f"all.py log codes: {count_codes(proxies['all'])}")
        notes.append(f"disk run log codes: {count_codes(proxies['disk'])}")
        for p in proxies.values():
            p.stop()
        proxies.clear()

        # peak RSS while filling 10x cache_mem, with large objects (the bodies dominate) and with
        # small ones (the bookkeeping per object dominates: 80,000 of them), all cacheable
        for obj in RSS_OBJECTS:
            p = Proxy(tmp_path / f"rss-{obj}", options={"cache_dir": str(tmp_path / f"rss-{obj}" / "cache"),
                                                         "cache_mem": f"{CACHE_MEM_MB} MB"})
            try:
                n = 10 * CACHE_MEM_MB * 1024 * 1024 // obj
                load(p.url, [f"{origin.url}/size/{obj}?fill={i}&{cc}" for i in range(n)], tmp_path)
                rss[obj] = peak_rss_mb(p.proc.pid)
            finally:
                p.stop()
    finally:
        for p in proxies.values():
            p.stop()
        origin.close()

    results = {name: statistics.median(v) for name, v in runs.items()}
    bare, ceiling = results["bare relay"], results["ceiling"]
    print(f"\n=== cache benchmark (requests/s, loopback, curl --parallel-max {PARALLEL}, "
          f"median of {ROUNDS} interleaved rounds of {N} requests) ===")
    for name, rps in results.items():
        print(f"  {name:18s} {rps:8.0f} req/s   rounds: {' '.join(f'{v:.0f}' for v in runs[name])}")
    print(f"  ceiling / bare relay        {ceiling / bare:5.2f}x")
    targets = {"mem hits / ceiling": 0.95, "disk hits / ceiling": 0.85, "misses / bare relay": 0.85}
    sequential = {"mem hits / ceiling": results["all.py mem hits"] / ceiling,
                  "disk hits / ceiling": results["all.py disk hits"] / ceiling,
                  "misses / bare relay": results["all.py misses"] / bare}
    if pairs:
        print(f"  ratios from paired runs (both proxies at once on one core, {PAIR_ROUNDS} runs of "
              f"{PAIR_SECONDS} s each, median; the machine's drift cancels out):")
        for name, target in targets.items():
            ratio = statistics.median(pairs[name])
            print(f"  {name:26s} {ratio:5.3f}x  (target >= {target}x)  {'ok' if ratio >= target else 'BELOW TARGET'}"
                  f"   runs: {' '.join(f'{v:.3f}' for v in pairs[name])}")
        print("  the same ratios from the sequential medians above (they also compare the machine's speed "
              "at different moments):")
    for name, target in targets.items():
        ratio = sequential[name]
        print(f"  {name:26s} {ratio:5.3f}x  (target >= {target}x)  {'ok' if ratio >= target else 'BELOW TARGET'}")
    limit = CACHE_MEM_MB + 150
    for obj, peak in rss.items():
        print(f"  peak RSS filling {10 * CACHE_MEM_MB} MB with cache_mem {CACHE_MEM_MB} MB, {obj // 1024} KB objects: "
              f"{peak:.0f} MB (target < {limit} MB)  {'ok' if peak < limit else 'ABOVE TARGET'}")
    print("  what the cache itself costs, the other Relais addons running on both sides"
          + (" (paired runs, then sequential medians):" if pairs else " (sequential medians):"))
    own = {"misses / all.py without cache": results["all.py misses"] / results["all.py without cache"],
           "mem hits / ceiling in all.py": results["all.py mem hits"] / results["ceiling in all.py"],
           "disk hits / ceiling in all.py": results["all.py disk hits"] / results["ceiling in all.py"]}
    for name, ratio in own.items():
        paired_text = (f"{statistics.median(pairs[name]):5.2f}x   runs: {' '.join(f'{v:.2f}' for v in pairs[name])};  "
                       if name in pairs else "")
        print(f"  {name:32s} {paired_text}sequential {ratio:5.2f}x")
    for n in notes:
        print("  " + n)
    assert all(v > 0 for v in results.values()) and all(v > 0 for r in pairs.values() for v in r)
