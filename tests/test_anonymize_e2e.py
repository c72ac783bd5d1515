"""Anonymization end to end: curl -> real mitmdump -> httpbin, which reports what it received.

Every level in regular, socks5, reverse and intercepted-HTTPS (regular and
socks5) flows. The proxies load tests/addons_for_tests/anon_stack.py
(set_acls stand-in for the acl addon, anonymize, accesslog), so no other
addon's policy gets in the way; one test checks addons/all.py too.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness import ROOT, Proxy, curl, free_ports

logging.getLogger("werkzeug").setLevel(logging.ERROR)
import httpbin  # noqa: E402  (warns about flasgger on import)
from werkzeug.serving import make_server  # noqa: E402

STACK = "tests/addons_for_tests/anon_stack.py"
SHIPPED = (ROOT / "policies" / "anonymize.yaml").read_text()
HOSTNAME = socket.gethostname()
LEVELS = ("transparent", "anonymous", "elite", "paranoid")
TRANSPORTS = ("regular-http", "socks5-http", "reverse-http", "regular-https", "socks5-https")
COMMON_UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
CLIENT_IP = "127.0.0.23"  # a distinctive loopback address for the client

# What the client sends on top of curl's Host and Accept.
IDENTITY = {
    "x-forwarded-for": "10.1.2.3", "forwarded": "for=10.1.2.3", "x-real-ip": "10.1.2.3",
    "client-ip": "10.1.2.3", "true-client-ip": "10.1.2.3", "x-client-ip": "10.1.2.3",
    "cf-connecting-ip": "10.1.2.3", "x-cluster-client-ip": "10.1.2.3", "from": "alice@example.org",
}
TO_PROXY = {"proxy-connection": "Keep-Alive", "proxy-authorization": "Basic Zm9vOmJhcg=="}
UNTOUCHED = {"authorization": "Bearer s3cret", "if-none-match": '"v1"', "cache-control": "max-age=0",
             "cookie": "session=abc", "accept": "*/*"}
CLIENT = {**IDENTITY, **TO_PROXY, **UNTOUCHED, "via": "1.0 clientside", "user-agent": "relais-test/1.0",
          "accept-language": "fr-CH, fr;q=0.9", "referer": "http://elsewhere.example/page?id=42"}


class Httpbin:
    """httpbin from PyPI on loopback (werkzeug, a thread), plain or TLS."""

    def __init__(self, tls=None):
        self.server = make_server("127.0.0.1", 0, httpbin.app, threaded=True, ssl_context=tls)
        self.port = self.server.server_port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def hb():
    s = Httpbin()
    yield s
    s.close()


@pytest.fixture(scope="module")
def hbs(cert):
    s = Httpbin(tls=cert)
    yield s
    s.close()


def start_all(tmp: Path, specs: dict[str, tuple]) -> dict[str, Proxy]:
    """Start several mitmdumps at once: {name: (modes, options)}."""
    def one(item):
        name, (modes, options) = item
        return name, Proxy(tmp / name, modes=modes, script=STACK, options=options)
    with ThreadPoolExecutor(len(specs)) as pool:
        return dict(pool.map(one, specs.items()))


@pytest.fixture(scope="module")
def proxies(tmp_path_factory, hb):
    """One proxy per level, plus `auto` (the default level, anonymize_backend on) and `override`
    (elite, with per-acl overrides in its policy). Modes: regular, socks5, reverse to httpbin."""
    tmp = tmp_path_factory.mktemp("anon")
    policy = tmp / "override.yaml"
    policy.write_text(SHIPPED.replace("overrides: []", "overrides:\n  - {acl: audited_net, level: transparent}\n"
                                                       "  - {acl: vip, level: paranoid}\n"))
    modes = ("regular", "socks5", f"reverse:{hb.url}")
    specs = {level: (modes, {"anonymize": level}) for level in LEVELS}
    specs["auto"] = (modes, {"anonymize_backend": True})
    specs["override"] = (modes, {"anonymize": "elite", "anonymize_policy": str(policy)})
    started = start_all(tmp, specs)
    yield started
    for p in started.values():
        p.stop()


def send(proxy: Proxy, transport: str, path: str, *args: str, hb=None, hbs=None, headers=CLIENT):
    """curl `path` through `proxy` by `transport`; returns (status, response headers, json body, http version)."""
    hdrs = [a for k, v in headers.items() for a in ("-H", f"{k}: {v}")]
    how, scheme = transport.split("-")
    base = (hbs if scheme == "https" else hb).url
    if how == "regular":
        target = ["-x", proxy.url, f"{base}{path}"]
    elif how == "socks5":
        target = ["--socks5-hostname", f"127.0.0.1:{proxy.ports[1]}", f"{base}{path}"]
    else:
        target = [f"http://127.0.0.1:{proxy.ports[2]}{path}"]
    if scheme == "https":
        target = ["--cacert", proxy.ca, "--suppress-connect-headers", *target]
    r = curl("-i", "-w", "\n%{http_version}", *hdrs, *args, *target)
    assert r.returncode == 0, (r.stderr, proxy.text()[-3000:])
    text = r.stdout.decode()
    head, _, rest = text.partition("\r\n\r\n")
    body, _, version = rest.rpartition("\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    resp = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        resp[k.strip().lower()] = v.strip()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    return status, resp, data, version.strip()


def received(data) -> dict[str, str]:
    return {k.lower(): v for k, v in data["headers"].items()}


def expected(level: str, host: str, version: str, client_ip: str = "127.0.0.1") -> dict[str, str]:
    """Exactly what the origin must see, written out per level (not computed from the policy)."""
    via = f"1.0 clientside, {version} {HOSTNAME} (relais)"
    want = {**CLIENT, "host": host}
    for k in TO_PROXY:              # meant for the proxy, dropped at every level
        del want[k]
    if level == "transparent":
        want.update({"via": via, "x-forwarded-for": f"10.1.2.3, {client_ip}"})
        return want
    for k in IDENTITY:
        del want[k]
    if level == "anonymous":
        want["via"] = via
        return want
    del want["via"]
    if level == "elite":
        want["referer"] = "http://elsewhere.example/"
        return want
    del want["referer"]
    want.update({"user-agent": COMMON_UA, "accept-language": "en-US,en;q=0.5"})
    return want


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("level", LEVELS)
def test_exact_headers_the_origin_sees(proxies, hb, hbs, level, transport):
    status, resp, data, version = send(proxies[level], transport, "/headers?show_env=1", hb=hb, hbs=hbs)
    assert status == 200 and resp["x-test-anonymize"] == level
    port = hbs.port if transport.endswith("https") else hb.port
    assert received(data) == expected(level, f"127.0.0.1:{port}", version)


@pytest.mark.parametrize("transport,level", [("regular-http", "elite"), ("socks5-http", "elite"),
                                             ("reverse-http", "transparent"), ("regular-https", "elite")])
def test_auto_is_elite_forward_transparent_reverse(proxies, hb, hbs, transport, level):
    status, resp, data, version = send(proxies["auto"], transport, "/anything?show_env=1", hb=hb, hbs=hbs)
    assert status == 200 and resp["x-test-anonymize"] == level
    port = hbs.port if transport.endswith("https") else hb.port
    assert received(data) == expected(level, f"127.0.0.1:{port}", version)


def test_reverse_backend_identity_stripped_when_enabled(proxies, hb):
    path = "/response-headers?X-Powered-By=PHP/8.3&X-AspNet-Version=4.0.30319&Via=1.1%20varnish&X-Kept=yes"
    # auto proxy: anonymize_backend on -> stripped in reverse mode only
    _, resp, _, _ = send(proxies["auto"], "reverse-http", path, hb=hb, headers={})
    assert resp["x-kept"] == "yes" and resp["content-type"].startswith("application/json")
    for name in ("server", "x-powered-by", "x-aspnet-version", "via"):
        assert name not in resp
    _, resp, _, _ = send(proxies["auto"], "regular-http", path, hb=hb, headers={})
    assert resp["server"].startswith("Werkzeug/") and resp["x-powered-by"] == "PHP/8.3"
    # option off (the level proxies): the backend's headers pass
    _, resp, _, _ = send(proxies["elite"], "reverse-http", path, hb=hb, headers={})
    assert resp["server"].startswith("Werkzeug/") and resp["via"] == "1.1 varnish"


@pytest.mark.parametrize("level", LEVELS)
def test_a_level_that_names_the_proxy_in_requests_names_it_in_responses_too(proxies, hb, level):
    """RFC 9110 7.6.3: Via in both directions, as Squid's `via on`."""
    path = "/response-headers?Via=1.1%20upstream"
    _, resp, _, _ = send(proxies[level], "regular-http", path, hb=hb, headers={})
    if level in ("transparent", "anonymous"):  # via: on
        assert resp["via"].startswith("1.1 upstream, 1.1 ") and resp["via"].endswith(" (relais)")
    else:
        assert resp["via"] == "1.1 upstream"


@pytest.mark.parametrize("transport", ["regular-http", "socks5-http"])
def test_paranoid_strips_cookies_of_listed_domains(proxies, hb, transport):
    headers = {"host": "ads.doubleclick.net", "cookie": "track=me"}
    path = "/response-headers?Set-Cookie=id%3D42"
    _, resp, data, _ = send(proxies["paranoid"], transport, path.replace("response-headers", "anything"),
                            hb=hb, headers=headers)
    assert "cookie" not in received(data) and received(data)["host"] == "ads.doubleclick.net"
    _, resp, _, _ = send(proxies["paranoid"], transport, path, hb=hb, headers=headers)
    assert "set-cookie" not in resp
    # elite keeps cookies; paranoid keeps them for other domains
    _, _, data, _ = send(proxies["elite"], transport, "/anything", hb=hb, headers=headers)
    assert received(data)["cookie"] == "track=me"
    _, resp, data, _ = send(proxies["paranoid"], transport, path, hb=hb, headers={"cookie": "a=b"})
    assert resp["set-cookie"].startswith("id=42")
    _, _, data, _ = send(proxies["paranoid"], transport, "/anything", hb=hb, headers={"cookie": "a=b"})
    assert received(data)["cookie"] == "a=b"


def test_same_site_referer_is_kept(proxies, hb):
    ref = f"{hb.url}/previous?page=2"
    for level in ("elite", "paranoid"):
        _, _, data, _ = send(proxies[level], "regular-http", "/headers", hb=hb, headers={"referer": ref})
        assert received(data)["referer"] == ref


@pytest.mark.parametrize("acls,level", [("audited_net", "transparent"), ("localnet, vip", "paranoid"),
                                        ("vip, audited_net", "transparent"), ("localnet", "elite"), (None, "elite")])
def test_per_acl_override(proxies, hb, acls, level):
    headers = dict(CLIENT, **({"x-test-acls": acls} if acls else {}))
    status, resp, data, version = send(proxies["override"], "regular-http", "/headers?show_env=1", hb=hb,
                                       headers=headers)
    assert resp["x-test-anonymize"] == level
    assert received(data) == expected(level, f"127.0.0.1:{hb.port}", version)


@pytest.mark.parametrize("transport", ["regular-http", "socks5-http", "reverse-http", "regular-https"])
def test_client_address_appears_nowhere_at_elite(proxies, hb, hbs, transport):
    form = ["--data-urlencode", "name=alice", "--data-urlencode", "comment=hello from behind a proxy"]
    status, _, data, _ = send(proxies["elite"], transport, "/anything?show_env=1&q=1", "--interface", CLIENT_IP,
                              *form, hb=hb, hbs=hbs)
    assert status == 200 and data["method"] == "POST"
    assert data["form"] == {"name": "alice", "comment": "hello from behind a proxy"}
    h = received(data)
    assert h["content-type"] == "application/x-www-form-urlencoded" and h["content-length"] == "44"
    assert h["authorization"] == "Bearer s3cret"
    assert CLIENT_IP not in json.dumps(data)  # headers, url, args, form, data, origin
    assert data["origin"] == "127.0.0.1"      # the proxy's own address
    # control: the same request at transparent does carry it
    _, _, data, _ = send(proxies["transparent"], transport, "/anything?show_env=1", "--interface", CLIENT_IP,
                         *form, hb=hb, hbs=hbs)
    assert received(data)["x-forwarded-for"] == f"10.1.2.3, {CLIENT_IP}"
    # the admin still sees the real client
    log = proxies["elite"]
    for _ in range(100):
        if any(f" {CLIENT_IP} " in line and " POST " in line and "/anything?" in line for line in log.log_lines()):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"no access-log line for {CLIENT_IP}: {log.log_lines()}")


@pytest.mark.parametrize("how", ["-x", "--socks5-hostname"])
def test_client_address_nowhere_in_raw_request(proxies, origin, how):
    """The raw bytes an origin receives (request line, every header field, body) at elite."""
    proxy = proxies["elite"]
    addr = proxy.url if how == "-x" else f"127.0.0.1:{proxy.ports[1]}"
    hdrs = [a for k, v in CLIENT.items() for a in ("-H", f"{k}: {v}")]
    r = curl(how, addr, "--interface", CLIENT_IP, *hdrs, "-d", "a=1&b=2", f"{origin.url}/post?x=y")
    assert r.returncode == 0 and r.stdout == b"hello /post", r.stderr
    seen = origin.requests[-1]
    assert seen.method == "POST" and seen.path == "/post?x=y" and seen.body == b"a=1&b=2"
    for k, v in seen.header_list:
        assert CLIENT_IP not in k + v and "10.1.2.3" not in v
    assert CLIENT_IP not in seen.path and CLIENT_IP.encode() not in seen.body
    assert {k.lower() for k, _ in seen.header_list} == {
        "host", "user-agent", "accept", "accept-language", "referer", "content-length", "content-type",
        *UNTOUCHED}
    line = proxy.log_line(f"{origin.url}/post?")  # this test's own origin: a line of its own
    assert f" {CLIENT_IP} TCP_MISS/200 " in line


# --- options, errors and reload through a real mitmdump -------------------------

def test_bad_level_stops_mitmdump(start_proxy):
    p = start_proxy(script=STACK, options={"anonymize": "stealth"}, wait=False)
    assert p.proc.wait(30) != 0
    assert "anonymize: 'stealth' is not a level; use one of auto, transparent, anonymous, elite, paranoid" in p.text()


def test_broken_policy_stops_mitmdump_with_file_and_line(start_proxy, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SHIPPED.replace("    referer: origin-when-cross-site", "    referer: sometimes"))
    line = bad.read_text().split("referer: sometimes")[0].count("\n") + 1
    p = start_proxy(script=STACK, options={"anonymize_policy": str(bad)}, wait=False)
    assert p.proc.wait(30) != 0
    assert f"anonymize_policy: {bad}:{line}: levels.elite.referer: 'sometimes' is not one of" in p.text()


def test_policy_change_is_picked_up_and_broken_one_ignored(start_proxy, hb, tmp_path):
    pol = tmp_path / "live.yaml"
    pol.write_text(SHIPPED.replace("visible_hostname: null", "visible_hostname: first.test"))
    p = start_proxy(script=STACK, options={"anonymize": "anonymous", "anonymize_policy": str(pol)})

    def via():
        _, _, data, _ = send(p, "regular-http", "/headers?show_env=1", hb=hb, headers={})
        return received(data).get("via")

    assert via() == "1.1 first.test (relais)"
    pol.write_text(SHIPPED.replace("visible_hostname: null", "visible_hostname: second.test"))
    end = time.monotonic() + 10
    while via() != "1.1 second.test (relais)" and time.monotonic() < end:
        time.sleep(0.2)
    assert via() == "1.1 second.test (relais)"
    pol.write_text(SHIPPED.replace("visible_hostname: null", "visible_hostname: third.test\n  oops: ["))
    end = time.monotonic() + 10
    while "policy not reloaded" not in p.text() and time.monotonic() < end:
        via()
        time.sleep(0.2)
    assert f"keeping the last good one: {pol}:" in p.text()
    assert via() == "1.1 second.test (relais)"


def test_a_broken_edit_of_the_policy_is_reported_on_an_idle_proxy(start_proxy, tmp_path):
    """The comment in anonymize.yaml promises it within a second: without any request coming."""
    pol = tmp_path / "idle.yaml"
    pol.write_text(SHIPPED)
    p = start_proxy(script=STACK, options={"anonymize_policy": str(pol)})
    pol.write_text(SHIPPED.replace("visible_hostname: null", "visible_hostname: x\n  oops: ["))
    p.wait_output(f"keeping the last good one: {pol}:")


def test_whole_suite_anonymizes_by_default(start_proxy, origin):
    """addons/all.py as run.sh loads it: a forward proxy is elite out of the box."""
    p = start_proxy()  # addons/all.py, default options
    r = curl("-x", p.url, "-H", "X-Forwarded-For: 10.1.2.3", "-H", "Via: 1.0 clientside",
             "-H", "X-Real-IP: 10.1.2.3", f"{origin.url}/hello")
    assert r.stdout == b"hello /hello", (r.stderr, p.text()[-2000:])
    names = {k.lower() for k, _ in origin.requests[-1].header_list}
    assert names == {"host", "user-agent", "accept"}


@pytest.mark.parametrize("level,origin_hits", [("paranoid", 1), ("elite", 2)])
def test_cache_varies_on_what_is_sent_upstream(start_proxy, origin, level, origin_hits):
    """With the whole suite, the cache (after anonymize) keys and varies on the rewritten request:
    at paranoid two browsers with different User-Agents are one variant of a `Vary: User-Agent` reply."""
    origin.route("/varied", lambda seen: (200, {"Content-Type": "text/plain", "Cache-Control": "max-age=600",
                                                    "Vary": "User-Agent"}, seen.headers["user-agent"].encode()))
    p = start_proxy(options={"anonymize": level})
    bodies = [curl("-x", p.url, "-A", ua, f"{origin.url}/varied").stdout for ua in ("Browser/1", "Browser/2")]
    assert origin.hits["/varied"] == origin_hits, p.text()[-2000:]
    if level == "paranoid":
        assert bodies == [COMMON_UA.encode()] * 2
    else:
        assert bodies == [b"Browser/1", b"Browser/2"]


def test_an_override_naming_an_acl_the_access_policy_lacks_is_reported(start_proxy, origin, tmp_path):
    pol = tmp_path / "anon.yaml"
    pol.write_text(SHIPPED.replace("overrides: []", "overrides:\n  - {acl: localhots, level: transparent}\n"
                                   "  - {acl: localhost, level: transparent}"))
    p = start_proxy(options={"anonymize": "elite", "anonymize_policy": str(pol)})
    for _ in range(2):
        assert curl("-x", p.url, f"{origin.url}/who").stdout == b"hello /who"
    line = pol.read_text().split("\n").index("  - {acl: localhots, level: transparent}") + 1
    p.wait_output(f"anonymize_policy: {pol}:{line}: overrides: acl localhots names acl 'localhots', which ")
    assert p.text().count("names acl") == 1, p.text()[-2000:]
    assert "via" in origin.requests[-1].headers  # the next override, on a defined acl, applies


def test_override_by_a_real_acl_of_the_whole_suite(start_proxy, origin, tmp_path):
    """addons/all.py: the access-control addon's predefined acl `localhost` (127.0.0.1, ::1) picks the level."""
    pol = tmp_path / "anon.yaml"
    pol.write_text(SHIPPED.replace("overrides: []", "overrides:\n  - {acl: localhost, level: transparent}"))
    p = start_proxy(options={"anonymize": "elite", "anonymize_policy": str(pol)})
    for source, via in (("127.0.0.1", True), (CLIENT_IP, False)):
        r = curl("-x", p.url, "--interface", source, f"{origin.url}/who")
        assert r.stdout == b"hello /who", (r.stderr, p.text()[-2000:])
        seen = origin.requests[-1].headers
        assert ("via" in seen) == via and (seen.get("x-forwarded-for") == "127.0.0.1") == via


def test_a_request_whose_via_names_this_proxy_is_a_forwarding_loop_and_refused(start_proxy, origin):
    """Squid: its own name in Via is a forwarding loop, answered 403 instead of sent round again."""
    p = start_proxy(options={"anonymize": "transparent"})
    me = socket.gethostname()
    r = curl("-i", "-x", p.url, "-H", f"Via: 1.0 elsewhere, 1.1 {me} (relais)", f"{origin.url}/looped")
    assert r.stdout.startswith(b"HTTP/1.1 403") and b"forwarding loop" in r.stdout
    assert "/looped" not in origin.hits
    assert curl("-x", p.url, "-H", f"Via: 1.1 not-{me} (relais)", f"{origin.url}/fine").stdout == b"hello /fine"


def test_two_proxies_sending_to_each_other_stop_at_once(start_proxy):
    """A parent misconfigured to send back to its child: without loop detection a POST went round
    about a hundred times a second."""
    a_port, b_port = free_ports(2)
    a = start_proxy(modes=(f"upstream:http://127.0.0.1:{b_port}",), ports=[a_port], options={"anonymize": "transparent"})
    b = start_proxy(modes=(f"upstream:http://127.0.0.1:{a_port}",), ports=[b_port], options={"anonymize": "transparent"})
    r = curl("-i", "-x", f"http://127.0.0.1:{a_port}", "-d", "x=1", "http://www.site.test/loop", timeout=10)
    assert r.stdout.startswith(b"HTTP/1.1 403"), r.stdout[:300]
    time.sleep(0.5)
    assert len(a.log_lines(1, timeout=2)) + len(b.log_lines(1, timeout=2)) <= 4


def test_a_hit_carries_via_as_the_level_of_its_own_request_says(start_proxy, origin, tmp_path):
    """The stored response was fetched at another level: this proxy's Via entry follows the request
    answered, not the one that stored it."""
    pol = tmp_path / "anon.yaml"
    pol.write_text(SHIPPED.replace("overrides: []", "overrides:\n  - {acl: localhost, level: transparent}"))
    p = start_proxy(options={"anonymize": "elite", "anonymize_policy": str(pol), "cache_dir": str(tmp_path / "c")})
    origin.route("/viahit", lambda s: (200, {"Cache-Control": "max-age=600", "Via": "1.1 origin-side"}, b"x"))
    ours = f"{socket.gethostname()} (relais)"

    def via(source):
        r = curl("-si", "-x", p.url, "--interface", source, f"{origin.url}/viahit")
        head = r.stdout.split(b"\r\n\r\n")[0].decode()
        return [line.split(": ", 1)[1] for line in head.split("\r\n") if line.lower().startswith("via:")]
    assert via("127.0.0.1") == [f"1.1 origin-side, 1.1 {ours}"]  # transparent: a miss, stored
    assert via(CLIENT_IP) == ["1.1 origin-side"]                    # elite: a hit, without ours
    assert via("127.0.0.1") == [f"1.1 origin-side, 1.1 {ours}"]      # ours once
    assert origin.hits["/viahit"] == 1
