"""Access-control benchmark (./run.sh bench), in one invocation:

1. decision cost of a policy with 10,000 dstdomain entries and 100 regexes (µs per decision, with and
   without the relais.acls export), against a naive scan of the same lists (the speed-up of compiling);
2. relay throughput through mitmdump with addons/all.py and the default policy, against the same
   pipeline without the ACL addon (tests/bench/pipeline_subset.py), as a ratio (target: at
   least 0.95). The ratio comes from paired runs, both proxies loaded at once on one core, as in
   the cache benchmark (tests/bench/loadgen.py says why); sequential rounds where the machine
   cannot pin processes to cores.

Results are printed; nothing is asserted on timing.
"""
from __future__ import annotations

import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from addons import aclrules  # noqa: E402
from loadgen import CLIENT_CORE, PROXY_CORE, FastOrigin, can_pin, load, paired, pin, wait_idle  # noqa: E402
from harness import ROOT, Proxy  # noqa: E402

DOMAINS = 10_000
REGEXES = 100
DECISIONS = 20_000
N = 1500          # requests per throughput round
ROUNDS = 5
PAIR_SECONDS = 6


def make_policy(tmp: Path) -> tuple[aclrules.Policy, list[str], list[str]]:
    rnd = random.Random(4)
    words = ["ads", "track", "cdn", "img", "shop", "news", "mail", "video", "stat", "pix"]
    domains = [f"{'.' if i % 2 else ''}{rnd.choice(words)}{i}.{rnd.choice(['com', 'net', 'org', 'test'])}"
               for i in range(DOMAINS)]
    regexes = [f"/{rnd.choice(words)}{i}/[a-z]+\\.(gif|png|js)$" for i in range(REGEXES)]
    (tmp / "domains.txt").write_text("\n".join(domains) + "\n")
    (tmp / "regexes.txt").write_text("\n".join(regexes) + "\n")
    text = """
acls:
  Safe_ports: port 80 443 1025-65535
  SSL_ports: port 443
  blocked: dstdomain "domains.txt"
  ads: url_regex -i "regexes.txt"
  lan: src 10.0.0.0/8 192.168.0.0/16 127.0.0.0/8
http_access:
  - deny !Safe_ports
  - deny CONNECT !SSL_ports
  - deny blocked
  - deny ads
  - allow lan
  - deny all
"""
    return aclrules.load_yaml_text(text, str(tmp / "bench.yaml"), tmp), domains, regexes


def requests(domains: list[str]) -> list[aclrules.Request]:
    rnd = random.Random(7)
    out = []
    for i in range(DECISIONS):
        kind = i % 4
        if kind == 0:   # a listed domain (or a subdomain of a .listed one)
            d = rnd.choice(domains)
            host = ("www" + d) if d.startswith(".") else d
        elif kind == 1:  # an unlisted, deep name
            host = f"a{i}.b.c{i % 97}.example{i % 13}.com"
        elif kind == 2:
            host = f"img{i}.cdn.test"
        else:
            host = f"10.0.{i % 256}.{i % 200}"
        path = f"/ads{i % 150}/pic.gif" if i % 5 == 0 else f"/page/{i}?q={i}"
        out.append(aclrules.Request(src=f"10.1.{i % 256}.{i % 250}", host=host, port=80, path=path,
                                    url=f"http://{host}{path}", headers={"User-Agent": "bench"}))
    return out


def per_call_us(fn, items) -> float:
    start = time.perf_counter()
    for r in items:
        fn(r)
    return (time.perf_counter() - start) / len(items) * 1e6


def test_bench_decision_cost(tmp_path):
    t = time.perf_counter()
    policy, domains, regexes = make_policy(tmp_path)
    load_ms = (time.perf_counter() - t) * 1000
    reqs = requests(domains)
    per_call_us(policy.check, reqs[:2000])  # warm-up
    check = per_call_us(policy.check, reqs)

    def with_export(r):
        d = policy.check(r)
        policy.matching(r, d.matched)
    full = per_call_us(with_export, reqs)

    exact = {d for d in domains if not d.startswith(".")}
    suffixes = [d for d in domains if d.startswith(".")]
    compiled = [re.compile(x, re.I) for x in regexes]

    def naive(r):  # what "scanning" the same lists costs: each entry, each regex, one by one
        h = r.host
        if h in exact or any(h == s[1:] or h.endswith(s) for s in suffixes):
            return False
        return not any(c.search(r.url) for c in compiled)
    sample = reqs[:2000]
    scan = per_call_us(naive, sample)
    denied = sum(not policy.check(r).allowed for r in reqs)
    print(f"\n[acl bench] policy: {DOMAINS} dstdomain entries + {REGEXES} regexes, loaded in {load_ms:.0f} ms")
    print(f"[acl bench] decision (http_access walk): {check:.2f} µs; with the relais.acls export: {full:.2f} µs "
          f"({denied}/{len(reqs)} denied)")
    print(f"[acl bench] naive scan of the same lists: {scan:.1f} µs -> compiled is {scan / check:.0f}x faster")


def test_bench_relay_with_and_without_acl(tmp_path):
    origin = FastOrigin()
    url = origin.url
    with_acl, without_acl = "with acl (default policy)", "without acl"
    proxies = {}
    try:
        options = {"policy": str(ROOT / "policies" / "default.yaml"), "access_log": "none"}
        proxies[with_acl] = Proxy(tmp_path / "with", options=options)
        proxies[without_acl] = Proxy(tmp_path / "without", script="tests/bench/pipeline_subset.py",
                                     options={"access_log": "none"}, env={"RELAIS_BENCH_WITHOUT": "AccessControl"})
        for p in proxies.values():  # warm-up
            load(p.url, [f"{url}/size/1000?warm={i}" for i in range(200)], tmp_path)
        print()
        if can_pin():
            pin(origin.proc.pid, CLIENT_CORE)
            for p in proxies.values():
                pin(p.proc.pid, PROXY_CORE)
            ratios = []
            for rnd in range(ROUNDS):  # half of the runs with each proxy started first
                urls = [f"{url}/size/1000?r={rnd}&n={i}" for i in range(16 * N)]  # more than a run can use
                for p in proxies.values():
                    wait_idle(p.proc.pid)
                ratios.append(paired((proxies[without_acl].url, urls), (proxies[with_acl].url, urls),
                                     tmp_path, PAIR_SECONDS, rnd % 2 == 1))
            ratio = statistics.median(ratios)
            print(f"[acl bench] paired runs ({ROUNDS} of {PAIR_SECONDS} s, both proxies at once on one core): "
                  f"{', '.join(f'{r:.3f}' for r in ratios)}")
        else:
            rates: dict[str, list[float]] = {k: [] for k in proxies}
            for rnd in range(ROUNDS):  # alternate, so drift hits both alike
                for name, p in proxies.items():
                    rates[name].append(load(p.url, [f"{url}/size/1000?r={rnd}&n={i}" for i in range(N)], tmp_path))
            med = {k: statistics.median(v) for k, v in rates.items()}
            ratio = med[with_acl] / med[without_acl]
            for k, v in rates.items():
                print(f"[acl bench] {k}: {med[k]:.0f} req/s (rounds: {', '.join(f'{x:.0f}' for x in v)})")
        print(f"[acl bench] relay throughput ratio with/without ACL: {ratio:.3f} (target >= 0.95)")
    finally:
        for p in proxies.values():
            p.stop()
        origin.close()
