"""The DNS cache (addons/dnscache.py, Squid's ipcache) against a real DNS server on loopback."""
from __future__ import annotations

import asyncio
import gc
import re
import socket
import time
from typing import Sequence

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addons import dnscache
from dns_server import DnsServer
from harness import curl

ORIGIN_NAME = "origin.relais.test"


# --- pure parts ---------------------------------------------------------------------------
def test_hosts_file_lines_are_read_as_resolvers_read_them():
    hosts = dnscache.parse_hosts(
        "# comment\n127.0.0.1 localhost Box.LAN  # trailing comment\n::1 localhost ip6-localhost\n"
        "not-an-address foo\n10.0.0.2\n192.0.2.7 box.lan.\n")
    assert hosts["localhost"] == ("127.0.0.1", "::1")
    assert hosts["box.lan"] == ("127.0.0.1", "192.0.2.7")  # names are case-insensitive, a final dot ignored
    assert hosts["ip6-localhost"] == ("::1",)
    assert "foo" not in hosts


@pytest.mark.parametrize("spec, parsed", [("10.0.0.53", ("10.0.0.53", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
                                          ("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353))])
def test_name_servers_are_ip_or_ip_and_port(spec, parsed):
    assert dnscache.parse_name_server(spec) == parsed


@pytest.mark.parametrize("spec", ["dns.example", "127.0.0.1:0", "127.0.0.1:x", "[::1", "1.2.3.4:70000"])
def test_a_bad_name_server_is_refused_by_value(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        dnscache.parse_name_server(spec)


def test_answers_are_kept_for_their_ttl_within_squids_bounds():
    assert dnscache.kept_for(300, positive_ttl=21600, negative_ttl=60) == 300
    assert dnscache.kept_for(5, positive_ttl=21600, negative_ttl=60) == 60  # negative_dns_ttl is also the least
    assert dnscache.kept_for(86400, positive_ttl=21600, negative_ttl=60) == 21600


@pytest.mark.parametrize("option, value, message", [
    ("dns_name_servers", ["dns.example"], "dns_name_servers: 'dns.example' is not IP or IP:port"),
    ("negative_dns_ttl", 0, "negative_dns_ttl: must be 1 or more, not 0"),
    ("ipcache_size", 0, "ipcache_size: must be 1 or more, not 0"),
])
def test_bad_options_are_refused_by_name(option, value, message):
    d = dnscache.DnsCache()
    with taddons.context(d) as tctx:
        if option == "dns_name_servers":  # mitmproxy's own option (its DNS mode's), declared by its addon
            tctx.master.options.add_option("dns_name_servers", Sequence[str], [], "name servers")
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(d, **{option: value})


# --- in process, with a real DNS server ------------------------------------------------------
def _with_cache(server: DnsServer | None, scenario, **options):
    """Run `scenario(cache, loop)` in an event loop with a DnsCache asking `server` (dead_port: none)."""
    async def main():
        d = dnscache.DnsCache()
        loop = asyncio.get_running_loop()
        own = loop.getaddrinfo
        with taddons.context(d) as tctx:
            tctx.master.options.add_option("dns_name_servers", Sequence[str], [], "name servers")
            tctx.master.options.add_option("dns_use_hosts_file", bool, True, "hosts file")
            tctx.configure(d, dns_name_servers=[server.address if server else options.pop("dead")], **options)
            d.running()
            try:
                return await scenario(d, loop)
            finally:
                d.done()
                assert loop.getaddrinfo == own  # the loop's own resolver is back
    return asyncio.run(main())


def test_an_answer_is_asked_once_and_kept_for_its_ttl():
    with DnsServer({ORIGIN_NAME: (["127.0.0.7", "::7", "127.0.0.8"], 1)}) as server:
        async def scenario(d, loop):
            first = await d.resolve(ORIGIN_NAME)
            again = await d.resolve(ORIGIN_NAME.upper() + ".")  # the same name
            asked = dict(server.queries)
            await asyncio.sleep(1.3)  # past its TTL (1 s, with negative_dns_ttl 1)
            await d.resolve(ORIGIN_NAME)
            return first, again, asked
        first, again, asked = _with_cache(server, scenario, negative_dns_ttl=1)
    assert again == first and sorted(first[:2]) == ["127.0.0.7", "127.0.0.8"] and first[2] == "::7"  # IPv4 first
    assert asked == {(ORIGIN_NAME, "A"): 1, (ORIGIN_NAME, "AAAA"): 1}
    assert server.queries[ORIGIN_NAME, "A"] == 2  # asked again once expired


def test_positive_dns_ttl_caps_a_long_ttl():
    with DnsServer({ORIGIN_NAME: (["127.0.0.7"], 86400)}) as server:
        async def scenario(d, loop):
            await d.resolve(ORIGIN_NAME)
            await asyncio.sleep(1.3)
            await d.resolve(ORIGIN_NAME)
        _with_cache(server, scenario, positive_dns_ttl=1, negative_dns_ttl=1)
    assert server.queries[ORIGIN_NAME, "A"] == 2


def test_a_name_that_does_not_exist_is_remembered_for_negative_dns_ttl():
    with DnsServer({}) as server:
        async def scenario(d, loop):
            errors = []
            for _ in range(3):
                with pytest.raises(dnscache.LookupFailed) as e:
                    await d.resolve("nosuch.relais.test")
                errors.append(str(e.value))
            asked = server.queries["nosuch.relais.test", "A"]
            await asyncio.sleep(1.3)
            with pytest.raises(dnscache.LookupFailed):
                await d.resolve("nosuch.relais.test")
            return errors, asked, d.stats()
        errors, asked, stats = _with_cache(server, scenario, negative_dns_ttl=1)
    assert errors == ["cannot resolve nosuch.relais.test: no such name (NXDOMAIN)"] * 3
    assert asked == 1 and server.queries["nosuch.relais.test", "A"] == 2
    assert "answered from the cache 2 (negative 2)" in stats and "queries 2 (failed 2)" in stats


def test_a_name_with_no_address_record_fails_and_so_does_a_silent_server():
    with DnsServer({"mail.relais.test": ([], 60)}, silent={"slow.relais.test"}) as server:
        async def scenario(d, loop):
            out = []
            for name in ("mail.relais.test", "slow.relais.test"):
                start = time.monotonic()
                with pytest.raises(dnscache.LookupFailed) as e:
                    await d.resolve(name)
                out.append((str(e.value), time.monotonic() - start))
            return out
        (no_address, _), (timeout, waited) = _with_cache(server, scenario, dns_timeout=1)
    assert no_address == "cannot resolve mail.relais.test: no address (no A or AAAA record)"
    assert timeout == "cannot resolve slow.relais.test: no answer from the name servers (timeout)"
    assert waited < 5  # dns_timeout, not dnspython's own default


def test_concurrent_lookups_of_a_name_make_one_query():
    with DnsServer({ORIGIN_NAME: (["127.0.0.7"], 300)}) as server:
        async def scenario(d, loop):
            return await asyncio.gather(*(d.resolve(ORIGIN_NAME) for _ in range(5)))
        answers = _with_cache(server, scenario)
    assert answers == [("127.0.0.7",)] * 5
    assert server.queries[ORIGIN_NAME, "A"] == 1


def test_ipcache_size_drops_the_least_recently_used_name():
    names = [f"n{i}.relais.test" for i in range(3)]
    with DnsServer({n: (["127.0.0.7"], 300) for n in names}) as server:
        async def scenario(d, loop):
            for n in (names[0], names[1], names[0], names[2]):  # n1 is the least recently used when n2 comes
                await d.resolve(n)
            await d.resolve(names[0])
            await d.resolve(names[1])
            return len(d.answers)
        kept = _with_cache(server, scenario, ipcache_size=2)
    assert kept == 2
    assert [server.queries[n, "A"] for n in names] == [1, 2, 1]


def test_the_event_loop_resolves_names_from_the_cache_and_addresses_as_before():
    with DnsServer({ORIGIN_NAME: (["127.0.0.7", "::7"], 300)}) as server:
        async def scenario(d, loop):
            stream = await loop.getaddrinfo(ORIGIN_NAME, 8080, type=socket.SOCK_STREAM)
            v6 = await loop.getaddrinfo(ORIGIN_NAME, "8080", family=socket.AF_INET6, type=socket.SOCK_STREAM)
            ip = await loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
            with pytest.raises(socket.gaierror, match="no such name"):
                await loop.getaddrinfo("nosuch.relais.test", 80)
            return stream, v6, ip
        stream, v6, ip = _with_cache(server, scenario)
    assert stream == [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.7", 8080)),
                      (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::7", 8080, 0, 0))]
    assert v6 == [stream[1]]
    assert ip[0][4] == ("127.0.0.1", 80)
    assert server.queries[ORIGIN_NAME, "A"] == 1


def test_a_dead_name_server_on_the_systems_terms_fails_in_dns_timeout(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:  # bound, never answers
        dead.bind(("127.0.0.1", 0))

        async def scenario(d, loop):
            start = time.monotonic()
            with pytest.raises(socket.gaierror, match="timeout"):
                await loop.getaddrinfo("nosuch.relais.test", 80)
            return time.monotonic() - start
        waited = _with_cache(None, scenario, dead=f"127.0.0.1:{dead.getsockname()[1]}", dns_timeout=1)
    assert 0.9 < waited < 4


# --- end to end: mitmdump with the whole suite ------------------------------------------------
def test_the_proxy_connects_by_the_cached_answer_and_answers_a_bad_name_with_squids_page(start_proxy, origin):
    with DnsServer({ORIGIN_NAME: (["127.0.0.1"], 300)}) as server:
        # negative_ttl 0: the cache does not remember the failed origin, so DNS is asked each time
        proxy = start_proxy(options={"dns_name_servers": server.address, "cache_dir": "none", "negative_ttl": 0})
        url = f"http://{ORIGIN_NAME}:{origin.port}"
        for i in range(3):  # a new client connection each time: a new upstream connection
            r = curl("-x", proxy.url, f"{url}/dns-{i}")
            assert r.stdout == f"hello /dns-{i}".encode(), proxy.text()
        assert server.queries[ORIGIN_NAME, "A"] == 1  # the errors addon's check and each connection: one query
        for _ in range(2):
            r = curl("-D", "-", "-o", "/dev/null", "-x", proxy.url, "http://nosuch.relais.test/")
            assert b"503" in r.stdout.split(b"\r\n")[0] and b"X-Squid-Error: ERR_DNS_FAIL" in r.stdout, r
        assert server.queries["nosuch.relais.test", "A"] == 1  # remembered: not asked again
        lines = [line for line in proxy.log_lines(5) if " GET " in line]  # (not the harness's readiness probe)
    assert all(" GET http://nosuch.relais.test/ - HIER_NONE/- " in line and " TCP_MISS/503 " in line
               for line in lines[3:]), lines
    assert " TCP_MISS/200 " in lines[0] and f" GET {url}/dns-0 - HIER_DIRECT/127.0.0.1 " in lines[0], lines


def test_intercepted_https_to_a_name_keeps_the_name(start_proxy, tls_origin):
    with DnsServer({ORIGIN_NAME: (["127.0.0.1"], 300)}) as server:
        proxy = start_proxy(options={"dns_name_servers": server.address, "cache_dir": "none"})
        url = f"https://{ORIGIN_NAME}:{tls_origin.port}/secret"
        r = curl("-k", "-x", proxy.url, url)
        assert r.stdout == b"hello /secret", (r, proxy.text())
        lines = proxy.log_lines(2)
    assert any(f" GET {url} - HIER_DIRECT/127.0.0.1 " in line for line in lines), lines  # the name, not the address
    assert server.queries[ORIGIN_NAME, "A"] == 1


def test_a_socks5_client_that_sends_the_name_gets_it_resolved_by_the_cache(start_proxy, origin):
    with DnsServer({ORIGIN_NAME: (["127.0.0.1"], 300)}) as server:
        proxy = start_proxy(modes=("socks5",), options={"dns_name_servers": server.address, "cache_dir": "none"})
        for i in range(2):
            r = curl("--socks5-hostname", f"127.0.0.1:{proxy.port}", f"http://{ORIGIN_NAME}:{origin.port}/socks-{i}")
            assert r.stdout == f"hello /socks-{i}".encode(), (r, proxy.text())
    assert server.queries[ORIGIN_NAME, "A"] == 1


def test_a_server_that_drops_aaaa_queries_does_not_hold_up_the_answer():
    with DnsServer({ORIGIN_NAME: (["127.0.0.7", "::7"], 300)}, silent={(ORIGIN_NAME, "AAAA")}) as server:
        async def scenario(d, loop):
            start = time.monotonic()
            return await d.resolve(ORIGIN_NAME), time.monotonic() - start
        answer, waited = _with_cache(server, scenario, dns_timeout=10)
    assert answer == ("127.0.0.7",)
    assert waited < 5  # the grace given to the other family, not dns_timeout


def test_the_systems_resolv_conf_is_read_as_the_c_library_reads_it(tmp_path, monkeypatch):
    conf = tmp_path / "resolv.conf"
    monkeypatch.setattr(dnscache, "RESOLV_CONF", str(conf))
    conf.write_text("nameserver 127.0.0.1\nnameserver 127.0.0.2\nsearch corp.test\noptions timeout:1 attempts:3\n")
    r = dnscache.DnsCache._resolver([])
    assert r.use_search_by_default and [n.to_text() for n in r.search] == ["corp.test."]  # short names as the system
    assert (r.timeout, r.lifetime) == (1, 6)  # each server `attempts` times
    conf.write_text("nameserver 127.0.0.1\n")
    r = dnscache.DnsCache._resolver([])
    assert (r.timeout, r.lifetime) == (5, 10)  # the C library's defaults: 5 s, 2 attempts


def test_a_second_dns_cache_stays_off_and_either_can_go_first():
    async def main():
        loop = asyncio.get_running_loop()
        own = loop.getaddrinfo
        for first_done in (0, 1):
            a, b = dnscache.DnsCache(), dnscache.DnsCache()
            with taddons.context(a):  # (mitmproxy itself refuses a second addon of that name: b is run by hand)
                a.running(), b.running()
                assert vars(loop)["getaddrinfo"] == a.getaddrinfo and not b.on
                (a, b)[first_done].done()
                (a, b)[1 - first_done].done()
                assert (await loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM))[0][4] == ("127.0.0.1", 80)
                assert loop.getaddrinfo == own
    asyncio.run(main())


def test_an_intercepted_https_request_for_a_bad_name_gets_squids_dns_page(start_proxy):
    with DnsServer({}) as server:
        proxy = start_proxy(options={"dns_name_servers": server.address, "cache_dir": "none"})
        r = curl("-k", "-v", "-x", proxy.url, "https://nosuch.relais.test/")
    assert b"HTTP/1.1 503" in r.stderr and b"X-Squid-Error: ERR_DNS_FAIL" in r.stderr, r.stderr[-2000:]


def test_a_lookup_that_fails_unexpectedly_after_its_callers_left_leaves_no_unretrieved_error():
    with DnsServer({}) as server:
        async def scenario(d, loop):
            unhandled = []
            loop.set_exception_handler(lambda _, context: unhandled.append(context.get("message")))

            async def broken(*args, **kwargs):
                await asyncio.sleep(0.05)
                raise RuntimeError("not a DNS error")
            d.resolver.resolve = broken
            waiting = asyncio.ensure_future(d.resolve(ORIGIN_NAME))
            await asyncio.sleep(0.01)
            waiting.cancel()  # the only caller leaves; the lookup goes on, and fails
            await asyncio.sleep(0.2)
            gc.collect()
            await asyncio.sleep(0)
            return unhandled, dict(d.queries)
        unhandled, queries = _with_cache(server, scenario)
    assert unhandled == [] and queries == {}
