"""addons/anonrules.py alone: the policy file and the header edits, no proxy."""
from __future__ import annotations

import re

import pytest

from harness import ROOT

from addons import anonrules as ar
from addons.anonrules import RequestInfo

SHIPPED = (ROOT / "policies" / "anonymize.yaml").read_text()
POLICY = ar.load_policy(SHIPPED, "policies/anonymize.yaml")
CLIENT = "192.0.2.7"

IDENTITY = [
    ("X-Forwarded-For", "10.1.2.3"), ("Forwarded", "for=10.1.2.3"), ("X-Real-IP", "10.1.2.3"),
    ("Client-IP", "10.1.2.3"), ("True-Client-IP", "10.1.2.3"), ("X-Client-IP", "10.1.2.3"),
    ("CF-Connecting-IP", "10.1.2.3"), ("X-Cluster-Client-IP", "10.1.2.3"), ("From", "alice@example.org"),
    ("Via", "1.0 clientside"), ("Proxy-Connection", "Keep-Alive"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
]
UNTOUCHABLE = [
    ("Host", "www.example.com"), ("Authorization", "Bearer s3cret"), ("Content-Type", "text/plain"),
    ("Content-Length", "5"), ("If-None-Match", '"v1"'), ("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ("Cache-Control", "max-age=0"), ("Pragma", "no-cache"), ("Range", "bytes=0-1"),
]
OTHER = [("User-Agent", "relais-test/1.0"), ("Accept-Language", "fr-CH, fr;q=0.9"), ("Cookie", "a=b"),
         ("Referer", "https://elsewhere.example/page?id=42")]


def run(level, fields, host="www.example.com", scheme="https", version="HTTP/1.1", policy=POLICY, **kw):
    """The headers sent upstream, as a {lower name: value} dict."""
    info = RequestInfo(client=CLIENT, scheme=scheme, host=host, http_version=version, **kw)
    edits = ar.plan_request(fields, policy.levels[level], info, "proxy.test", policy.via_comment)
    out: dict[str, str] = {}
    for k, v in fields:
        out[k.lower()] = f"{out[k.lower()]}, {v}" if k.lower() in out else v
    ar.apply([(n.lower(), v) for n, v in edits], out)
    return out


ALL = IDENTITY + UNTOUCHABLE + OTHER


def test_shipped_policy_levels():
    assert tuple(POLICY.levels) == ar.LEVELS
    assert POLICY.levels["transparent"].via == "on" and POLICY.levels["transparent"].forwarded_for == "on"
    assert POLICY.levels["anonymous"].via == "on" and POLICY.levels["anonymous"].forwarded_for == "delete"
    assert POLICY.levels["elite"].via == "delete"
    assert set(POLICY.levels["elite"].remove) <= set(POLICY.levels["paranoid"].remove)
    assert "server" in POLICY.strip_response and "x-powered-by" in POLICY.strip_response
    assert POLICY.overrides == ()


def test_transparent_is_squids_defaults():
    out = run("transparent", ALL)
    assert out["x-forwarded-for"] == f"10.1.2.3, {CLIENT}"
    assert out["via"] == "1.0 clientside, 1.1 proxy.test (relais)"
    assert "proxy-connection" not in out and "proxy-authorization" not in out
    # everything else as the client sent it
    for k, v in IDENTITY[1:9] + UNTOUCHABLE + OTHER:
        assert out[k.lower()] == v


def test_anonymous_has_no_client_address_but_via():
    out = run("anonymous", ALL)
    assert out["via"] == "1.0 clientside, 1.1 proxy.test (relais)"
    for k, _ in IDENTITY:
        if k != "Via":
            assert k.lower() not in out
    assert "10.1.2.3" not in str(out) and CLIENT not in str(out)
    for k, v in UNTOUCHABLE + OTHER:
        assert out[k.lower()] == v


def test_elite_removes_every_trace_and_cuts_cross_site_referer():
    out = run("elite", ALL)
    assert set(out) == {k.lower() for k, _ in UNTOUCHABLE + OTHER}
    assert out["referer"] == "https://elsewhere.example/"
    for k, v in UNTOUCHABLE + OTHER[:3]:
        assert out[k.lower()] == v


def test_paranoid_fingerprint_referer_and_cookies():
    out = run("paranoid", ALL)
    assert "referer" not in out
    assert out["user-agent"].startswith("Mozilla/5.0") and out["accept-language"] == "en-US,en;q=0.5"
    assert out["cookie"] == "a=b"  # www.example.com is not in strip_cookies
    out = run("paranoid", ALL, host="stats.g.doubleclick.net")
    assert "cookie" not in out
    # no User-Agent from the client: the common one is sent anyway
    out = run("paranoid", [("Host", "a.example")], host="a.example")
    assert out["user-agent"].startswith("Mozilla/5.0")
    for k, v in UNTOUCHABLE:
        assert run("paranoid", ALL)[k.lower()] == v


@pytest.mark.parametrize("referer,host,scheme,elite,paranoid", [
    ("https://www.example.com/a?b=1", "www.example.com", "https", "keep", "keep"),
    ("https://static.example.com/x", "www.example.com", "https", "keep", "keep"),     # same site
    ("https://www.example.co.uk/x", "shop.example.co.uk", "https", "keep", "keep"),
    ("https://a.co.uk/x", "b.co.uk", "https", "origin", "remove"),                    # public suffix
    ("http://www.example.com/x", "www.example.com", "https", "origin", "remove"),      # scheme differs
    ("https://other.org:8443/x?y", "www.example.com", "https", "origin", "remove"),
    ("http://127.0.0.1:8080/p", "127.0.0.1", "http", "keep", "keep"),
    ("http://127.0.0.2/p", "127.0.0.1", "http", "origin", "remove"),
    ("http://a.localhost/p", "b.localhost", "http", "origin", "remove"),              # unknown suffix: host alone
    ("not a url", "www.example.com", "https", "remove", "remove"),
])
def test_referer(referer, host, scheme, elite, paranoid):
    for level, want in (("elite", elite), ("paranoid", paranoid)):
        out = run(level, [("Referer", referer)], host=host, scheme=scheme)
        if want == "keep":
            assert out["referer"] == referer
        elif want == "remove":
            assert "referer" not in out
        else:
            assert out["referer"] == ar.origin_of(referer) and out["referer"].endswith("/")
            assert "?" not in out["referer"] and "/x" not in out["referer"]


def test_via_version_and_appending():
    assert run("transparent", [], version="HTTP/2.0")["via"] == "2 proxy.test (relais)"
    assert run("transparent", [], version="HTTP/1.0")["via"] == "1.0 proxy.test (relais)"
    assert run("transparent", [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")])[
        "x-forwarded-for"] == f"1.1.1.1, 2.2.2.2, {CLIENT}"


def test_keep_protects_upstream_auth():
    out = run("elite", [("Proxy-Authorization", "Basic dXA6c3RyZWFt")], keep=("proxy-authorization",))
    assert out["proxy-authorization"] == "Basic dXA6c3RyZWFt"


def test_edits_never_touch_protected_headers():
    edits = ar.plan_request(ALL, POLICY.levels["paranoid"], RequestInfo(CLIENT, "https", "x.doubleclick.net"), "h")
    for name, _ in edits:
        assert not ar.is_protected(name)


def test_response_plan():
    fields = [("Server", "nginx"), ("X-Powered-By", "PHP/8"), ("Via", "1.1 varnish"), ("Set-Cookie", "t=1"),
              ("Content-Type", "text/html")]
    assert ar.plan_response(fields, "www.example.com", POLICY.levels["elite"]) == []
    assert {n for n, _ in ar.plan_response(fields, "www.example.com", None, POLICY.strip_response)} == \
        {"server", "x-powered-by", "via"}
    assert ar.plan_response(fields, "ad.doubleclick.net", POLICY.levels["paranoid"]) == [("set-cookie", None)]


def test_choose_level():
    pol = ar.load_policy(SHIPPED.replace("overrides: []", "overrides:\n  - {acl: audited_net, level: transparent}\n"
                                         "  - {acl: vip, level: paranoid}"), "p.yaml")
    assert ar.choose_level("auto", "regular", None, pol) == ("elite", None)
    assert ar.choose_level("auto", "socks5", [], pol) == ("elite", None)
    assert ar.choose_level("auto", "reverse", None, pol) == ("transparent", None)
    assert ar.choose_level("anonymous", "reverse", None, pol) == ("anonymous", None)
    level, ov = ar.choose_level("elite", "regular", ["localnet", "audited_net"], pol)
    assert (level, ov.acl) == ("transparent", "audited_net")
    assert ar.choose_level("elite", "regular", ["vip", "audited_net"], pol)[0] == "transparent"  # policy order
    assert ar.choose_level("transparent", "regular", ["vip"], pol)[0] == "paranoid"
    assert ar.choose_level("elite", "regular", ["other"], pol) == ("elite", None)


def test_check_level_option():
    for v in ("auto", *ar.LEVELS):
        assert ar.check_level_option(v) == v
    with pytest.raises(ValueError, match="'elit' is not a level"):
        ar.check_level_option("elit")


def broken(old, new):
    assert old in SHIPPED
    return SHIPPED.replace(old, new, 1)


def line_of(text, needle):
    return text[: text.index(needle)].count("\n") + 1


@pytest.mark.parametrize("text,needle,reason", [
    (broken("    via: delete", "    via: maybe"), "via: maybe", "levels.elite.via: 'maybe' is not one of"),
    (broken("    - From\n", "    - Host\n"), "- Host", "Host is protected"),
    (broken("    referer: keep\n  anonymous", "    referer: nope\n  anonymous"), "referer: nope", "referer"),
    (broken("  paranoid:", "  paranoia:"), "paranoia:", "unknown key 'paranoia'"),
    (broken("overrides: []", "overrides:\n  - {acl: x, level: secret}"), "level: secret", "overrides[0].level"),
    (broken("overrides: []", "overrides:\n  - {level: elite}"), "- {level", "missing 'acl'"),
    (broken("      Accept-Language:", "      Content-Language:"), "Content-Language", "protected"),
    (broken("    like: elite", "    like: paranoid"), "like: paranoid", "'like' loops"),
    (broken("    - Server\n", "    - Content-Encoding\n"), "- Content-Encoding", "needed to read the response"),
    (broken("via_comment: relais", "via_comment: relais: proxy"), "relais: proxy", "not valid YAML"),
    (broken("levels:", "levls:"), "levls:", "unknown key 'levls'"),
    (broken("    - X-Real-IP\n", "    - X Real IP\n"), "X Real IP", "is not a header name"),
    (broken("      - criteo.com", "      - crit/eo.com"), "crit/eo", "is not a domain"),
])
def test_broken_policy_names_line_and_reason(text, needle, reason):
    with pytest.raises(ar.PolicyError) as e:
        ar.load_policy(text, "pol.yaml")
    assert e.value.source == "pol.yaml"
    assert reason in e.value.reason
    assert e.value.line == line_of(text, needle), str(e.value)
    assert str(e.value).startswith(f"pol.yaml:{e.value.line}: ")


def test_policy_structure_errors():
    with pytest.raises(ar.PolicyError, match="empty"):
        ar.load_policy("", "p")
    with pytest.raises(ar.PolicyError, match=re.escape("levels: missing level 'paranoid'")):
        ar.load_policy("levels:\n  transparent: {}\n  anonymous: {}\n  elite: {}\n", "p")
    with pytest.raises(ar.PolicyError, match="duplicate key 'levels'"):
        ar.load_policy("levels: {}\nlevels: {}\n", "p")
    minimal = ar.load_policy("levels: {transparent: {}, anonymous: {}, elite: {}, paranoid: {like: elite}}", "p")
    assert minimal.levels["paranoid"].via == "off" and minimal.strip_response == ()
