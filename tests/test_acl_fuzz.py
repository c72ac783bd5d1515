"""Fuzz: random policy files never crash the loaders; they give a policy or a clear PolicyError."""
from __future__ import annotations

import datetime as dt

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons import aclrules
from addons.aclrules import PolicyError, Request

TYPES = list(aclrules.TYPES) + ["colour", "src_as", ""]
VALUES = st.sampled_from([
    "10.0.0.0/8", "127.0.0.1", "::1", "fe80::/10", "1.2.3.4-1.2.3.9", "10.0.0.0/255.0.0.0", "300.1.1.1", "all",
    ".example.com", "www.test", ".", "-i", "+i", "-n", "--", "^a.*b$", "([", "\\.gif$", "80", "1025-65535",
    "70000", "5-1", "GET", "CONNECT", "HTTP", "MTWHF", "09:00-17:00", "18:00-09:00", "X", "REQUIRED", "alice",
    "X-Header", "1", "-1", '"/nonexistent/file"', '"', "!", "#", "é", "\t", "a b",
])
NAME = st.sampled_from(["a", "b", "Safe_ports", "all", "localhost", "CONNECT", "bad name", "x!", "", "é"])


VALID = {
    "src": ["10.0.0.0/8", "127.0.0.1", "::1", "1.2.3.4-1.2.3.9", "10.0.0.0/255.0.0.0", "all"],
    "dst": ["127.0.0.0/8", "1.2.3.5", "fe80::/10"],
    "dstdomain": [".example.com", "www.test", "-n", "b.test"],
    "dstdom_regex": ["-i", "^www", "\\.test$", "+i"],
    "url_regex": ["-i", "\\.gif$", "^http://"],
    "urlpath_regex": ["^/a", "-i", "gif"],
    "port": ["80", "443", "1025-65535"],
    "localport": ["3128"],
    "myportname": ["regular", "socks5"],
    "proto": ["HTTP", "NONE"],
    "method": ["GET", "CONNECT", "PURGE"],
    "time": ["MTWHF", "09:00-17:00", "S"],
    "browser": ["-i", "^curl", "x"],
    "referer_regex": ["intranet"],
    "req_header": ["X-Header", "-i", "^1$"],
    "proxy_auth": ["REQUIRED", "alice", "-i"],
    "proxy_auth_regex": ["^a"],
    "maxconn": ["1", "4"],
    "ssl::server_name": [".b.test"],
    "ssl::server_name_regex": ["^b"],
    "all": [],
}


@st.composite
def acl_value(draw):
    kind = draw(st.integers(0, 9))
    if kind <= 5:  # mostly well-formed, Squid syntax
        t = draw(st.sampled_from(sorted(VALID)))
        vals = VALID[t]
        if t == "req_header":
            words = ["X-Header"] + draw(st.lists(st.sampled_from(["-i", "^1$", "x"]), min_size=1, max_size=3))
        elif t == "maxconn":
            words = [draw(st.sampled_from(vals))]
        elif not vals:
            words = []
        else:
            words = draw(st.lists(st.sampled_from(vals), min_size=0 if t in ("all", "time") else 1, max_size=4))
        if draw(st.integers(0, 5)) == 0:
            words.append(draw(VALUES))  # maybe a bad one
        return " ".join([t, *words]).replace("\\", "\\\\").join('""')
    line = " ".join([draw(st.sampled_from(TYPES))] + draw(st.lists(VALUES, max_size=5)))
    if kind == 6:
        return line.replace("\\", "\\\\").replace('"', '\\"').join('""')
    if kind == 7:
        return "[" + ", ".join(line2.replace(",", "") for line2 in (line, draw(st.sampled_from(TYPES)) + " 1")) + "]"
    if kind == 8:
        return "{type: %s, values: [%s]}" % (draw(st.sampled_from(TYPES)) or "''",
                                             ", ".join(f"'{v}'" for v in draw(st.lists(VALUES, max_size=3))))
    return draw(st.text(max_size=20))


@st.composite
def policy_text(draw):
    parts = []
    names = ["all", "localhost", "CONNECT"]
    if draw(st.integers(0, 5)):
        parts.append("acls:")
        for i in range(draw(st.integers(0, 6))):
            name = draw(NAME) if draw(st.integers(0, 6)) == 0 else f"acl{i}"
            names.append(name)
            parts.append(f"  {name}: {draw(acl_value())}")
    for directive in ("http_access", "ssl_bump"):
        if draw(st.integers(0, 5)) or (directive == "ssl_bump" and draw(st.booleans())):
            parts.append(f"{directive}:")
            for _ in range(draw(st.integers(0, 5))):
                if directive == "http_access":
                    action = draw(st.sampled_from(["allow", "deny"] * 8 + ["permit", ""]))
                else:
                    action = draw(st.sampled_from(["splice", "bump", "peek", "terminate", "stare", "nope"]))
                pool = names + ["zzz", "!"] if draw(st.integers(0, 6)) == 0 else names
                terms = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
                terms = [("!" + t) if draw(st.booleans()) and not t.startswith("!") else t for t in terms]
                parts.append(f"  - {action} {' '.join(terms)}".rstrip())
    text = "\n".join(parts)
    if draw(st.integers(0, 5)) == 0:  # and some damage
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.text(max_size=10)) + text[i:]
    return text


REQUESTS = [
    Request(src="127.0.0.1", host="www.example.com", port=80, url="http://www.example.com/a.gif", path="/a.gif",
            headers={"User-Agent": "x", "X-Header": "1"}, user="alice", now=dt.datetime(2024, 1, 1, 10, 0)),
    Request(src="10.1.2.3", method="CONNECT", proto="NONE", host="1.2.3.5", port=443, sni="b.test",
            rdns=("none",), dst_ips=("1.2.3.5",), conns=5),
    Request(),
]


def check_result(load):
    try:
        policy = load()
    except PolicyError as e:
        assert str(e) and e.reason and (e.line is None or e.line >= 1)
        return
    for r in REQUESTS:
        d = policy.check(r)
        assert d.action in ("allow", "deny") and d.rule
        policy.matching(r, d.matched)
        policy.precheck(r)
        b = policy.bump(r)
        assert b is None or b.action in ("splice", "bump", "terminate")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_text())
def test_random_yaml_policies_load_or_fail_clearly(text):
    check_result(lambda: aclrules.load_yaml_text(text, "fuzz.yaml"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_loads_or_fails_clearly(text):
    check_result(lambda: aclrules.load_yaml_text(text, "fuzz.yaml"))
    check_result(lambda: aclrules.load_squid_text(text, "fuzz.conf"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acl", "http_access", "ssl_bump", "http_port", "#"]),
                          st.lists(st.one_of(NAME, st.sampled_from(TYPES), VALUES), max_size=6)), max_size=8))
def test_random_squid_conf_loads_or_fails_clearly(lines):
    text = "\n".join(" ".join([d, *words]) for d, words in lines)
    check_result(lambda: aclrules.load_squid_text(text, "fuzz.conf"))
