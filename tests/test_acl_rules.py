"""Unit tests of addons/aclrules.py: each acl type, rule order, negation, the implicit last rule,
list files, errors with file and line, the squid.conf importer."""
from __future__ import annotations

import datetime as dt
import json
import textwrap
from pathlib import Path

import pytest

from addons import aclrules
from addons.aclrules import PolicyError, Request, load_squid_text, load_yaml_text

ROOT = Path(__file__).resolve().parents[1]


def pol(text: str, base: Path | None = None) -> aclrules.Policy:
    return load_yaml_text(textwrap.dedent(text), "p.yaml", base)


def one(acl_def: str, base: Path | None = None) -> aclrules.Policy:
    """A policy allowing only requests that match acl `x` defined as acl_def."""
    return pol(f"""
        acls:
          x: {json.dumps(acl_def)}
        http_access:
          - allow x
        """, base)


def allowed(p: aclrules.Policy, **kw) -> bool:
    kw.setdefault("src", "127.0.0.1")
    return p.check(Request(**kw)).allowed


def http(url: str, **kw) -> dict:
    from urllib.parse import urlsplit
    u = urlsplit(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    port = u.port or (443 if u.scheme == "https" else 80)
    return dict(host=u.hostname, port=port, url=url, path=path, proto=u.scheme.upper(), **kw)


# --- acl types ------------------------------------------------------------------

def test_src_addresses_cidr_masks_ranges_ipv6():
    p = one("src 10.0.0.0/8 192.168.1.5 172.16.0.0/255.255.0.0 192.0.2.10-192.0.2.20 2001:db8::/32")
    for ip in ("10.1.2.3", "192.168.1.5", "172.16.9.9", "192.0.2.10", "192.0.2.20", "2001:db8::1",
               "::ffff:10.0.0.1"):
        assert allowed(p, src=ip), ip
    for ip in ("11.0.0.1", "192.168.1.6", "172.17.0.1", "192.0.2.21", "2001:db9::1", "garbage"):
        assert not allowed(p, src=ip), ip


def test_dst_uses_resolved_addresses_or_ip_host():
    p = one("dst 127.0.0.0/8")
    assert allowed(p, host="127.0.0.2")
    assert allowed(p, host="example.test", dst_ips=("10.0.0.1", "127.0.0.1"))
    assert not allowed(p, host="example.test", dst_ips=("10.0.0.1",))
    assert not allowed(p, host="example.test")          # unresolved: no match


def test_dstdomain_leading_dot_rule_and_case():
    p = one("dstdomain .example.com www.other.org")
    assert allowed(p, host="example.com")
    assert allowed(p, host="a.b.EXAMPLE.com")
    assert allowed(p, host="www.other.org")
    assert not allowed(p, host="other.org")
    assert not allowed(p, host="a.www.other.org")
    assert not allowed(p, host="badexample.com")
    assert not allowed(p, host="example.com.evil")


def test_ip_hosts_match_domain_acls_by_reverse_name_unless_n():
    p = one("dstdomain .example.com")
    assert p.uses_rdns
    assert allowed(p, host="192.0.2.1", rdns=("www.example.com",))
    assert not allowed(p, host="192.0.2.1", rdns=("none",)) and not allowed(p, host="192.0.2.1")
    assert not allowed(p, host="other.test", rdns=("www.example.com",))  # only for IP hosts
    p = one("dstdomain -n .example.com")
    assert not p.uses_rdns and not allowed(p, host="192.0.2.1", rdns=("www.example.com",))
    p = one("dstdom_regex ^none$")
    assert allowed(p, host="192.0.2.1", rdns=("none",))  # Squid's name for a failed lookup


def test_dstdom_regex_url_regex_urlpath_regex_with_i_toggles():
    p = one(r"dstdom_regex -i \.EXAMPLE\.com$")
    assert allowed(p, host="www.example.com") and not allowed(p, host="example.org")
    p = one(r"url_regex ^http://a\.test/ -i /SECRET")
    assert allowed(p, **http("http://a.test/x")) and allowed(p, **http("http://b.test/secret"))
    assert not allowed(p, **http("http://A.TEST:81/x"))
    p = one(r"urlpath_regex \.gif$ +i \.PNG")
    assert allowed(p, **http("http://a.test/x.gif")) and allowed(p, **http("http://a.test/y.PNG?z"))
    assert not allowed(p, **http("http://a.test/x.GIF")) and not allowed(p, **http("http://a.test/y.png"))


def test_port_method_proto_localport_myportname():
    p = one("port 80 443 1025-65535")
    assert allowed(p, port=80) and allowed(p, port=8080) and not allowed(p, port=22)
    p = one("method GET PURGE")
    assert allowed(p, method="PURGE") and not allowed(p, method="get") and not allowed(p, method="POST")
    p = one("proto HTTP")
    assert allowed(p, proto="HTTP") and not allowed(p, proto="HTTPS") and not allowed(p, proto="NONE")
    p = one("localport 3128")
    assert allowed(p, local_port=3128) and not allowed(p, local_port=3129)
    p = one("myportname socks5 reverse:http://127.0.0.1:8080")
    assert allowed(p, port_names=("socks5", "socks5", "1080"))
    assert allowed(p, port_names=("reverse", "reverse:http://127.0.0.1:8080", "9000"))
    assert not allowed(p, port_names=("regular", "regular", "3128"))


def test_time_days_and_hours():
    p = one("time MTWHF 09:00-17:00")
    monday_10 = dt.datetime(2024, 1, 1, 10, 0)      # a Monday
    assert allowed(p, now=monday_10)
    assert allowed(p, now=monday_10.replace(hour=17, minute=0))
    assert not allowed(p, now=monday_10.replace(hour=8, minute=59))
    assert not allowed(p, now=dt.datetime(2024, 1, 6, 10, 0))  # Saturday
    p = one("time SA")
    assert allowed(p, now=dt.datetime(2024, 1, 7, 3, 0)) and not allowed(p, now=monday_10)
    p = one("time 22:00-23:59")
    assert allowed(p, now=dt.datetime(2024, 1, 3, 23, 30))


def test_browser_referer_req_header():
    p = one("browser -i ^curl/")
    assert allowed(p, headers={"User-Agent": "CURL/8.0"}) and not allowed(p, headers={"User-Agent": "Mozilla"})
    assert not allowed(p, headers={})
    p = one(r"req_header X-Team -i ^ops$")
    assert allowed(p, headers={"x-team": "OPS"}) and not allowed(p, headers={"x-team": "dev"})
    assert not allowed(p, headers={"x-other": "ops"})
    p = one(r"referer_regex intranet")
    assert allowed(p, headers={"Referer": "http://intranet/x"})


def test_proxy_auth_names_required_and_auth_challenge():
    p = pol("""
        acls:
          admins: proxy_auth alice bob
          users: proxy_auth REQUIRED
        http_access:
          - allow admins
          - deny users
        """)
    assert allowed(p, user="alice")
    d = p.check(Request(src="127.0.0.1", user="carol"))
    assert not d.allowed and d.auth and d.rule == "http_access deny users"   # deny decided by proxy_auth: 407
    d = p.check(Request(src="127.0.0.1"))
    assert not d.allowed and d.auth                                            # no user: 407
    p = one("proxy_auth -i Alice")
    assert allowed(p, user="ALICE")
    p = pol("""
        acls:
          u: proxy_auth alice
        http_access:
          - allow u
        """)
    d = p.check(Request(src="127.0.0.1", user="carol"))   # implicit deny after a proxy_auth acl: Squid re-asks
    assert not d.allowed and d.auth


def test_proxy_auth_not_reached_asks_nothing():
    p = pol("""
        acls:
          u: proxy_auth REQUIRED
        http_access:
          - allow localhost
          - allow u
        """)
    assert allowed(p, src="127.0.0.1")
    assert p.check(Request(src="10.0.0.1")).auth


def test_maxconn_ssl_server_name_all():
    p = one("maxconn 2")
    assert not allowed(p, conns=2) and allowed(p, conns=3)
    p = one("ssl::server_name .bank.test")
    assert allowed(p, host="1.2.3.4", sni="www.bank.test") and allowed(p, host="bank.test")
    assert not allowed(p, host="bank.test.evil")
    p = one("ssl::server_name_regex -i ^MAIL\\.")
    assert allowed(p, sni="mail.example.com")
    p = pol("http_access:\n  - allow all\n")
    assert allowed(p, src="203.0.113.9")



def test_host_is_seen_lowercased_as_squid_does():
    # Squid parses the URL host to lower case (differential test: http://LOCALHOST/ vs ^LOCALHOST$)
    p = one("dstdom_regex ^LOCALHOST$")
    assert not allowed(p, **http("http://LOCALHOST:8080/up"))
    p = one("dstdom_regex ^localhost$")
    assert allowed(p, **http("http://LOCALHOST:8080/up"))
    p = one("url_regex ^http://localhost:8080/UP$")      # host lowercased, path kept as sent
    assert allowed(p, **http("HTTP://LOCALHOST:8080/UP")) and not allowed(p, **http("http://localhost:8080/up"))
    p = one("ssl::server_name_regex ^lower\\.test$")
    assert allowed(p, method="CONNECT", host="LOWER.test", port=443, url="LOWER.test:443")
    r = Request(host="WWW.Example.TEST", url="WWW.Example.TEST:443")
    assert (r.host, r.url) == ("www.example.test", "www.example.test:443")


def test_ssl_server_name_options_as_squid_without_a_certificate():
    connect = dict(method="CONNECT", proto="NONE", host="www.bank.test", port=443, url="www.bank.test:443")
    # no option / --client-requested / --consensus: the CONNECT host (or SNI) when no certificate is known
    for opt in ("", "--client-requested ", "--consensus "):
        assert allowed(one(f"ssl::server_name {opt}.bank.test"), **connect), opt
        assert allowed(one(f"ssl::server_name_regex {opt}-i ^WWW\\."), **connect), opt
    # --server-provided: only the certificate's names; without one Squid matches the name "none"
    assert not allowed(one("ssl::server_name --server-provided .bank.test"), **connect)
    assert allowed(one("ssl::server_name --server-provided none"), **connect)
    assert not allowed(one("ssl::server_name_regex --server-provided bank"), **connect)
    # with the certificate's names known
    certs = dict(connect, server_names=("*.bank.test", "bank.test"))
    assert allowed(one("ssl::server_name --server-provided bank.test"), **certs)
    assert allowed(one("ssl::server_name --consensus .bank.test"), **certs)
    assert not allowed(one("ssl::server_name --consensus .bank.test"), **dict(certs, server_names=("evil.test",)))
    assert allowed(one("ssl::server_name --client-requested www.bank.test"), **dict(certs, server_names=("x.test",)))
    with pytest.raises(PolicyError, match="at most one"):
        one("ssl::server_name --server-provided --consensus .bank.test")

# --- rules ------------------------------------------------------------------------

def test_first_match_wins_and_and_and_negation():
    p = pol("""
        acls:
          lan: src 10.0.0.0/8
          bad: dstdomain .bad.test
        http_access:
          - deny lan bad
          - allow lan !bad
          - allow localhost
        """)
    assert not allowed(p, src="10.1.1.1", host="x.bad.test")
    d = p.check(Request(src="10.1.1.1", host="good.test"))
    assert d.allowed and d.rule == "http_access allow lan !bad" and d.line == 7
    # implicit last rule: opposite of the last one (allow) -> deny
    d = p.check(Request(src="192.0.2.1", host="good.test"))
    assert not d.allowed and "implicit" in d.rule


def test_implicit_rule_is_allow_after_a_deny_and_deny_without_rules():
    p = pol("""
        acls:
          bad: dstdomain bad.test
        http_access:
          - deny bad
        """)
    assert allowed(p, host="good.test") and not allowed(p, host="bad.test")
    p = pol("http_access: []\n")
    assert not allowed(p)


def test_default_policy_is_squid_default():
    p = aclrules.load(ROOT / "policies/default.yaml")
    assert allowed(p, src="127.0.0.1", **http("http://a.test:8080/"))
    assert allowed(p, src="127.0.0.5", **http("http://a.test/"))
    assert allowed(p, src="::1", **http("http://a.test/"))
    assert allowed(p, src="192.168.1.1", **http("http://a.test/"))
    assert not allowed(p, src="203.0.113.7", **http("http://a.test/"))            # never an open proxy
    assert not allowed(p, src="127.0.0.1", **http("http://a.test:22/"))            # !Safe_ports
    assert allowed(p, src="127.0.0.1", method="CONNECT", proto="NONE", host="a.test", port=443, url="a.test:443")
    assert not allowed(p, src="127.0.0.1", method="CONNECT", proto="NONE", host="a.test", port=8443)
    assert allowed(p, src="127.0.0.1", **http("http://a.test/squid-internal-mgr/info"))
    assert not allowed(p, src="10.0.0.1", **http("http://a.test/squid-internal-mgr/info"))
    assert allowed(p, src="127.0.0.1", method="PURGE", **http("http://a.test/x"))
    assert not allowed(p, src="10.0.0.1", method="PURGE", **http("http://a.test/x"))


def test_matching_lists_acls_that_match():
    p = pol("""
        acls:
          lan: src 10.0.0.0/8
          ex: dstdomain .example.com
          far: dst 192.0.2.0/24
          u: proxy_auth REQUIRED
        http_access:
          - allow lan
        """)
    r = Request(src="10.0.0.1", host="www.example.com")
    assert p.matching(r) == ["all", "ex", "lan"]            # dst unresolved and no user: skipped / no match
    r.dst_ips, r.user = ("192.0.2.1",), "alice"
    assert p.matching(r) == ["all", "ex", "far", "lan", "u"]


def test_ssl_bump_rules():
    p = pol("""
        acls:
          banks: ssl::server_name .bank.test
        http_access:
          - allow all
        ssl_bump:
          - peek all
          - splice banks
          - bump all
        """)
    assert p.bump(Request(sni="www.bank.test")).action == "splice"
    assert p.bump(Request(sni="www.shop.test")).action == "bump"
    assert pol("http_access:\n  - allow all\n").bump(Request()) is None
    p = pol("""
        acls:
          banks: ssl::server_name .bank.test
        http_access: [allow all]
        ssl_bump: [bump banks]
        """)
    assert p.bump(Request(sni="x.test")).action == "splice"   # Squid's default: splice


# --- lists from files ------------------------------------------------------------

def test_list_files_relative_to_policy(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/bad.txt").write_text("# blocked\n.bad.test\n\nevil.test  # comment\n")
    p = pol("""
        acls:
          bad: dstdomain "lists/bad.txt"
          many: {type: dstdomain, file: lists/bad.txt}
        http_access:
          - deny bad
          - allow all
        """, base=tmp_path)
    assert not allowed(p, host="a.bad.test") and not allowed(p, host="evil.test") and allowed(p, host="good.test")


def test_100k_domains_from_a_file(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("\n".join(f".site{i}.test" for i in range(100_000)))
    p = one(f'dstdomain "{f}"')
    assert allowed(p, host="www.site99999.test") and not allowed(p, host="site100000.test")


# --- errors: file, line, reason ---------------------------------------------------

@pytest.mark.parametrize("text, line, words", [
    ("acls:\n  a: src 10.0.0.0/8\n  b: src 10.0.0.300\nhttp_access:\n  - allow a\n", 3, "bad address"),
    ("acls:\n  a: colour red\nhttp_access:\n  - allow a\n", 2, "unknown acl type"),
    ("acls:\n  a: src 10.0.0.0/8\nhttp_access:\n  - allow a\n  - allow b\n", 5, "unknown acl 'b'"),
    ("acls:\n  a: src 10.0.0.0/8\nhttp_access:\n  - permit a\n", 4, "action must be"),
    ("acls:\n  a: url_regex ([a\nhttp_access:\n  - allow a\n", 2, "bad regex"),
    ("acls:\n  a: port 99999\nhttp_access:\n  - allow a\n", 2, "bad port"),
    ("acls:\n  a: time 18:00-09:00\nhttp_access:\n  - allow a\n", 2, "less than"),
    ("acls: [\nhttp_access:\n", 3, "YAML"),
    ("http_access:\n  - allow a\n", 2, "unknown acl"),
    ("acl: {}\nhttp_access: []\n", 1, "unknown key"),
    ("acls:\n  a: src 10.0.0.1\n", 1, "no http_access"),
    ("acls:\n  a: src 10.0.0.1\n  a: src 10.0.0.2\nhttp_access: [allow a]\n", 3, "defined twice"),
    ("acls:\n  a: [src 10.0.0.1, port 80]\nhttp_access: [allow a]\n", 2, "differs"),
])
def test_errors_name_file_line_and_reason(text, line, words):
    with pytest.raises(PolicyError) as e:
        load_yaml_text(text, "bad.yaml")
    assert e.value.line == line, str(e.value)
    assert str(e.value).startswith(f"bad.yaml:{line}: ")
    assert words in str(e.value)


def test_error_in_list_file_names_that_file_and_line(tmp_path):
    (tmp_path / "ips.txt").write_text("10.0.0.1\n10.0.0.2\nnot-an-ip\n")
    with pytest.raises(PolicyError) as e:
        load_yaml_text('acls:\n  a: src "ips.txt"\nhttp_access: [allow a]\n', "p.yaml", tmp_path)
    assert e.value.file == str(tmp_path / "ips.txt") and e.value.line == 3
    with pytest.raises(PolicyError, match="cannot read list file"):
        load_yaml_text('acls:\n  a: src "missing.txt"\nhttp_access: [allow a]\n', "p.yaml", tmp_path)


# --- squid.conf --------------------------------------------------------------------

SQUID = """
acl localnet src 10.0.0.0/8     # RFC 1918
acl localnet src 192.168.0.0/16
acl SSL_ports port 443
acl Safe_ports port 80 443
acl Safe_ports port 1025-65535
acl blocked dstdomain .bad.test
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access deny blocked
http_access allow localnet
http_access allow localhost
http_access deny all
http_port 3128
refresh_pattern . 0 20% 4320
"""


def test_squid_conf_import_gives_the_same_decisions_as_yaml():
    sq = load_squid_text(SQUID, "squid.conf")
    ym = load_yaml_text(aclrules.squid_to_yaml(SQUID), "converted.yaml")
    cases = [dict(src="10.1.1.1", **http("http://a.test/")), dict(src="10.1.1.1", **http("http://x.bad.test/")),
             dict(src="192.168.3.3", **http("http://a.test:22/")), dict(src="203.0.113.1", **http("http://a.test/")),
             dict(src="127.0.0.1", method="CONNECT", proto="NONE", host="a.test", port=443),
             dict(src="127.0.0.1", method="CONNECT", proto="NONE", host="a.test", port=8443)]
    got = [sq.check(Request(**c)).allowed for c in cases]
    assert got == [True, False, False, False, True, False]
    assert [ym.check(Request(**c)).allowed for c in cases] == got
    assert sq.check(Request(**cases[1])).line == 10


def test_a_squid_conf_comment_ending_in_a_backslash_continues_nothing():
    """As Squid parses it: comment and empty lines are skipped, also inside a continued line."""
    conf = ("acl lan src \\\n  10.0.0.0/8 \\\n# 172.16.0.0/12 \\\n\n  192.168.0.0/16\n# from C:\\squid\\\n"
            "http_access deny lan\nhttp_access allow all\n")
    p = load_squid_text(conf, "squid.conf")
    assert not p.check(Request(src="10.1.1.1", **http("http://a.test/"))).allowed
    assert not p.check(Request(src="192.168.1.1", **http("http://a.test/"))).allowed  # after the comment
    assert p.check(Request(src="172.16.1.1", **http("http://a.test/"))).allowed  # commented out
    assert p.check(Request(src="192.0.2.1", **http("http://a.test/"))).allowed
    assert aclrules.squid_lines(conf)[4:7] == ["acl lan src    10.0.0.0/8    192.168.0.0/16", "", "http_access deny lan"]


def test_squid_conf_errors_have_line_numbers():
    with pytest.raises(PolicyError) as e:
        load_squid_text("acl a src 10.0.0.0/8\n\nhttp_access allow b\n", "squid.conf")
    assert e.value.line == 3 and "squid.conf:3:" in str(e.value)


def test_load_dispatches_on_suffix(tmp_path):
    (tmp_path / "squid.conf").write_text(SQUID)
    assert len(aclrules.load(tmp_path / "squid.conf").http_access) == 6
    with pytest.raises(PolicyError, match="cannot read"):
        aclrules.load(tmp_path / "nope.yaml")


def test_precheck_decides_only_when_certain():
    p = aclrules.load(ROOT / "policies/default.yaml")
    conn = dict(src="127.0.0.1", host="127.0.0.1", port=22)
    d = p.precheck(Request(**conn))
    assert d is not None and not d.allowed and d.rule == "http_access deny !Safe_ports"
    assert p.precheck(Request(src="127.0.0.1", host="127.0.0.1", port=8080)) is None  # CONNECT unknown yet
    assert not p.precheck(Request(src="203.0.113.1", host="127.0.0.1", port=443)).allowed  # no rule can allow
    q = pol("""
        acls:
          web: dstdomain .web.test
          lan: src 10.0.0.0/8
        http_access:
          - deny !lan
          - allow web
        """)
    assert not q.precheck(Request(src="192.0.2.1", port=80)).allowed
    assert q.precheck(Request(src="10.0.0.1", port=80)) is None
    u = pol("""
        acls:
          u: proxy_auth REQUIRED
        http_access:
          - allow u
        """)
    assert u.precheck(Request(src="10.0.0.1")) is None and u.precheck(Request(user="a")).allowed


def test_verdicts_are_remembered_per_request_facts():
    p = pol("""
        acls:
          ua: browser -i curl
          lunch: time 12:00-12:59
          admin: req_header X-Admin ^yes$
        http_access:
          - deny ua
          - allow admin
          - allow lunch
          - deny all
        """)
    noon, night = dt.datetime(2026, 1, 5, 12, 30), dt.datetime(2026, 1, 5, 23, 30)
    cases = [({"User-Agent": "curl/8"}, noon, False), ({"User-Agent": "Firefox"}, noon, True),
             ({"User-Agent": "Firefox"}, night, False), ({"User-Agent": "Firefox", "X-Admin": "yes"}, night, True),
             ({"User-Agent": "curl/8"}, noon, False)]
    for headers, now, expected in cases:
        d, acls = p.verdict(Request(src="127.0.0.1", url="http://a/", host="a", headers=headers, now=now))
        assert d.allowed == expected, (headers, now)
        assert d.allowed == p.check(Request(src="127.0.0.1", url="http://a/", host="a", headers=headers,
                                            now=now)).allowed
    assert len(p.memo) == 4, "the repeated request was answered from the memo"
    d, acls = p.verdict(Request(src="127.0.0.1", url="http://a/", host="a", headers={"User-Agent": "Firefox"},
                                now=noon))
    assert acls == ["all", "localhost", "lunch"]


def test_new_urls_are_answered_from_the_memo_by_the_url_acls_results():
    p = pol("""
        acls:
          ads: url_regex -i /ads/
          images: urlpath_regex \\.png
          from_search: referer_regex ^https?://search\\.example/
        http_access:
          - deny ads
          - deny images !from_search
          - allow all
        """)
    cases = [("http://a/ads/1", "/ads/1", None, False), ("http://a/x/1", "/x/1", None, True),
             ("http://a/x.png", "/x.png", None, False), ("http://a/y.png", "/y.png", "https://search.example/q", True),
             ("http://a/ADS/2", "/ADS/2", "https://other.example/", False)]
    for i in range(50):
        for url, path, referer, allowed in cases:
            r = dict(src="127.0.0.1", host="a", url=f"{url}?n={i}", path=f"{path}?n={i}",
                     headers={"Referer": referer} if referer else {})
            d, acls = p.verdict(Request(**r))
            assert d.allowed == allowed == p.check(Request(**r)).allowed, (url, referer)
            assert acls == p.matching(Request(**r))
    assert len(p.memo) == 4, "one verdict per combination of the url acls' results, not one per URL"


def includes(tmp_path: Path) -> Path:
    """A squid.conf that includes conf.d/*.conf (as Debian's does) and a quoted name with a space."""
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "20-rules.conf").write_text("# local rules\nhttp_access deny blocked\n")
    (tmp_path / "conf.d" / "10-acls.conf").write_text("acl blocked dstdomain .blocked.test\n")
    (tmp_path / "conf.d" / "README").write_text("not a .conf: not read\n")
    (tmp_path / "last rules.conf").write_text("http_access allow all\n")
    conf = tmp_path / "squid.conf"
    conf.write_text('http_port 3128\ninclude conf.d/*.conf\ninclude "last rules.conf"\n')
    return conf


def test_a_squid_conf_reads_the_files_it_includes_in_order(tmp_path):
    conf = includes(tmp_path)
    p = aclrules.load(conf)
    assert not allowed(p, **http("http://www.blocked.test/"))
    assert allowed(p, **http("http://www.other.test/"))
    d = p.check(Request(src="127.0.0.1", **http("http://www.blocked.test/")))
    assert (d.rule, d.line) == ("http_access deny blocked", 2)  # the line in its own file
    assert [(r.file, r.line) for r in p.http_access] == [(str(tmp_path / "conf.d" / "20-rules.conf"), 2),
                                                          (str(tmp_path / "last rules.conf"), 1)]
    # what a reload watches: the glob's folder (a file added there) and each file read
    assert p.includes == tuple(str(tmp_path / n) for n in ("conf.d", "conf.d/10-acls.conf", "conf.d/20-rules.conf",
                                                           "last rules.conf"))
    # the converter reads them too
    ym = load_yaml_text(aclrules.squid_to_yaml(conf.read_text(), tmp_path), "converted.yaml")
    assert not allowed(ym, **http("http://www.blocked.test/")) and allowed(ym, **http("http://www.other.test/"))


@pytest.mark.parametrize("line,where,reason", [
    ("include conf.d/*.cfg", "squid.conf:2", "include: no file matches 'conf.d/*.cfg'"),
    ("include missing.conf", "squid.conf:2", "include: cannot read"),
    ("include", "squid.conf:2", "include: needs a file name"),
    ("include self.conf", "self.conf:1", "include: nested more than 16 deep"),
    ("include bad.conf", "bad.conf:2", "http_access: unknown acl 'nobody'"),
])
def test_an_include_that_cannot_be_followed_is_an_error_with_its_file_and_line(tmp_path, line, where, reason):
    (tmp_path / "self.conf").write_text("include self.conf\n")
    (tmp_path / "bad.conf").write_text("acl a src 10.0.0.0/8\nhttp_access deny nobody\n")
    conf = tmp_path / "squid.conf"
    conf.write_text(f"acl lan src 10.0.0.0/8\n{line}\nhttp_access allow lan\n")
    with pytest.raises(PolicyError) as e:
        aclrules.load(conf)
    assert str(e.value).startswith(f"{tmp_path / where}: {reason}"), str(e.value)


def test_a_glob_include_in_a_folder_whose_name_looks_like_a_pattern(tmp_path):
    top = tmp_path / "squid[1]"
    (top / "conf.d").mkdir(parents=True)
    (top / "conf.d" / "a.conf").write_text("http_access deny all\n")
    (top / "squid.conf").write_text("include conf.d/*.conf\n")
    assert not allowed(aclrules.load(top / "squid.conf"), **http("http://a.test/"))


def test_an_acl_defined_again_in_another_file_with_another_type_names_both_files(tmp_path):
    (tmp_path / "a.conf").write_text("acl x dstdomain .a.test\n")
    conf = tmp_path / "squid.conf"
    conf.write_text("acl x src 10.0.0.0/8\ninclude a.conf\n")
    with pytest.raises(PolicyError) as e:
        aclrules.load(conf)
    assert str(e.value) == (f"{tmp_path / 'a.conf'}:1: acl x: type 'dstdomain' differs from its first "
                            f"definition ('src', {conf}:1)")


def test_squid_conf_access_directives_relais_does_not_apply_are_named_not_silently_dropped():
    conf = ("acl video rep_mime_type video/\nhttp_access allow all\nhttp_reply_access deny video\n"
            "deny_info TCP_RESET all\nforwarded_for delete\ncache_mem 64 MB\n")
    p = load_squid_text(conf.replace("acl video rep_mime_type video/\n", ""), "squid.conf")
    assert p.notes == ("squid.conf:2: http_reply_access is not applied by Relais (responses are not judged)",
                       "squid.conf:3: deny_info is not applied by Relais (denials get Squid's ERR_ACCESS_DENIED page)",
                       "squid.conf:4: forwarded_for is not applied by Relais (the anonymize option decides)")


def test_the_check_command_prints_those_warnings(tmp_path, capsys):
    from addons import aclrules
    conf = tmp_path / "squid.conf"
    conf.write_text("http_access allow all\nhttp_reply_access deny all\n")
    assert aclrules.main(["check", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "OK (" in out and f"warning: {conf}:2: http_reply_access is not applied by Relais" in out
