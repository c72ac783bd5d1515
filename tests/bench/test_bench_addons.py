"""What each addon of the suite costs on a request (./run.sh bench), in one invocation.

Each addon of addons/all.py runs alone in a Suite, as all.py composes them, and is compared
with an empty Suite (both tests/bench/pipeline_subset.py). Also compared: the empty Suite with
the bare relay (what loading a script costs), and all.py with the empty Suite and with the bare
relay. Every request is a cacheable miss (a new URL with
Cache-Control: max-age), so the cache stores each response and its disk writer writes it.

The ratios come from paired runs, both proxies loaded at once on one core and the rest on the
other, as in the cache benchmark (tests/bench/loadgen.py says why). The disk writer is pinned
to the proxies' core with its proxy. Where processes cannot be pinned, the proxies are loaded
one after the other instead. Each comparison starts its two proxies afresh. A ratio of 0.97
means the addon takes 3 % of the throughput; differences of 2 to 3 % are within the noise of
these runs (the runs of each ratio are printed), so the table tells the large costs from the
small ones, no more. The costs do not add up exactly to all.py's: each addon alone also pays
for the suite around it.
Results are printed; nothing is asserted on timing.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from addons import all as suite  # noqa: E402
from loadgen import CLIENT_CORE, PROXY_CORE, FastOrigin, can_pin, load, paired, pin, wait_idle  # noqa: E402
from harness import ROOT, Proxy  # noqa: E402

ROUNDS = 4          # runs per ratio, half of them with each proxy started first
PAIR_SECONDS = 5
N = 1500            # requests per run where the proxies cannot be pinned

SUBSET = "tests/bench/pipeline_subset.py"


def start_proxy(tmp: Path, script: str | None, without: list[str], origin: str) -> Proxy:
    """mitmdump with `script` (None: the bare relay), all.py's addons named in `without` left out."""
    p = Proxy(tmp, script=script, options={"policy": str(ROOT / "tests" / "policies" / "test.yaml"),
                                           "cache_mem": "8 MB", "cache_dir": str(tmp / "cache")},
              env={"RELAIS_BENCH_WITHOUT": ",".join(without)})
    try:
        load(p.url, [f"{origin}/size/1000?warm={i}&h.Cache-Control=max-age=3600" for i in range(200)], tmp)
    except BaseException:
        p.stop()
        raise
    return p


def test_bench_addons(tmp_path):
    origin = FastOrigin()
    cc = "h.Cache-Control=max-age=3600"
    members = [type(a).__name__ for a in suite.pipeline]
    setups = {"bare relay": (None, []), "empty suite": (SUBSET, members), "all.py": ("addons/all.py", []),
              **{m: (SUBSET, [n for n in members if n != m]) for m in members}}  # (script, addons left out)
    comparisons = [("empty suite", "bare relay"), *((m, "empty suite") for m in members),
                   ("all.py", "empty suite"), ("all.py", "bare relay")]
    pinned = can_pin()
    if pinned:
        pin(origin.proc.pid, CLIENT_CORE)
    results: dict[tuple[str, str], list[float]] = {}
    proxies: list[Proxy] = []
    try:
        for c, (b, a) in enumerate(comparisons):
            # Fresh proxies for each comparison: one that served the runs before would carry their state
            # (stored objects, a disk writer still busy) into this one.
            for side, name in (("a", a), ("b", b)):
                proxies.append(start_proxy(tmp_path / f"{c}-{side}", *setups[name], origin.url))
            pa, pb = proxies
            if pinned:
                for p in proxies:
                    pin(p.proc.pid, PROXY_CORE)
            for r in range(ROUNDS):
                many = 8 * N if pinned else N  # paired: more than a run can use
                ua, ub = ([f"{origin.url}/size/1000?{side}={i}&r={r}&{cc}" for i in range(many)] for side in "ab")
                for p in proxies:
                    wait_idle(p.proc.pid)  # the disk writes of the run before are not this run's cost
                if pinned:
                    ratio = paired((pa.url, ua), (pb.url, ub), tmp_path, PAIR_SECONDS, r % 2 == 1)
                else:
                    ratio = load(pb.url, ub, tmp_path) / load(pa.url, ua, tmp_path)
                results.setdefault((b, a), []).append(ratio)
            while proxies:
                proxies.pop().stop()
    finally:
        for p in proxies:
            p.stop()
        origin.close()

    how = (f"paired runs, {ROUNDS} of {PAIR_SECONDS} s, median" if pinned
           else f"one proxy after the other, {ROUNDS} runs of {N} requests, median")
    print(f"\n=== what each addon costs on a cacheable miss (requests/s ratios; {how}) ===")
    for (b, a), ratios in results.items():
        ratio = statistics.median(ratios)
        label = f"{b} alone / {a}" if b in members else f"{b} / {a}"
        print(f"  {label:34s} {ratio:5.3f}x  cost {100 * (1 - ratio):5.1f} %   runs: "
              f"{' '.join(f'{v:.3f}' for v in ratios)}")
    assert all(v > 0 for r in results.values() for v in r)
