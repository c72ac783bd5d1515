"""The access-control addon in process (mitmproxy's test context): options, reload, hooks."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons import acl, meta

ROOT = Path(__file__).resolve().parents[1]

POLICY = """
acls:
  blocked: urlpath_regex ^/{path}
  ex: dstdomain .example.com
http_access:
  - deny blocked
  - allow localhost
"""


def flow(path="/x", host="www.example.com", method="GET"):
    f = tflow.tflow()
    f.request.host, f.request.port, f.request.path, f.request.method = host, 80, path, method
    f.client_conn.peername = ("127.0.0.1", 40000)
    return f


def test_policy_option_loads_and_decides(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY.format(path="no"))
    ac = acl.AccessControl()
    with taddons.context(ac) as tctx:
        tctx.configure(ac, policy=str(tmp_path / "p.yaml"))
        f = flow("/no/1")
        ac.requestheaders(f)
        assert f.response.status_code == 403 and f.response.headers["X-Squid-Error"] == "ERR_ACCESS_DENIED 0"
        assert f.metadata[meta.CODE] == "TCP_DENIED" and f.metadata[meta.LOCAL] == "acl"
        assert f.metadata[meta.ACL]["rule"] == "http_access deny blocked"
        assert f.metadata[meta.ACLS] == ["all", "blocked", "ex", "localhost"]
        assert f.comment == "denied by: http_access deny blocked" and f.marked == ":no_entry:"
        f = flow("/yes")
        ac.requestheaders(f)
        assert f.response is None and f.metadata[meta.ACL]["action"] == "allow"
        assert f.comment == "allowed by: http_access allow localhost"
        f = flow("/other")
        f.response = tflow.tresp()  # answered by an earlier addon: left alone
        ac.requestheaders(f)
        assert meta.ACL not in f.metadata


def test_bad_policy_is_an_options_error_with_file_line_reason(tmp_path):
    (tmp_path / "bad.yaml").write_text("acls:\n  a: port x\nhttp_access: [allow a]\n")
    ac = acl.AccessControl()
    with taddons.context(ac) as tctx:
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(ac, policy=str(tmp_path / "bad.yaml"))
        assert f"{tmp_path / 'bad.yaml'}:2: acl a (port): bad port 'x'" in str(e.value)
        assert str(e.value).startswith("policy: ")
        for bad in ("-1", "soon", "nan"):
            with pytest.raises(exceptions.OptionsError, match="policy_watch"):
                tctx.configure(ac, policy_watch=bad)
        with pytest.raises(exceptions.OptionsError, match="never an open proxy"):
            tctx.configure(ac, policy=" ")


def test_default_policy_is_found_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ac = acl.AccessControl()
    with taddons.context(ac) as tctx:
        tctx.configure(ac, policy=acl.DEFAULT_POLICY)  # the option's default, relative
        assert ac.path == ROOT / "policies" / "default.yaml"
        f = flow("/", host="127.0.0.1")
        f.request.port = 8080
        ac.requestheaders(f)
        assert f.response is None
        f = flow("/", host="127.0.0.1")
        f.request.port = 22
        ac.requestheaders(f)
        assert f.response.status_code == 403
        f = flow("/", host="127.0.0.1")
        f.client_conn.peername = ("203.0.113.9", 5000)  # not a local client: never an open proxy
        ac.requestheaders(f)
        assert f.response.status_code == 403


def test_reload_command_keeps_the_last_good_policy(tmp_path, caplog):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY.format(path="one"))
    ac = acl.AccessControl()
    with taddons.context(ac) as tctx:
        tctx.configure(ac, policy=str(p), policy_watch="0")
        p.write_text(POLICY.format(path="two"))
        tctx.command(ac.reload)
        f = flow("/two")
        ac.requestheaders(f)
        assert f.response.status_code == 403
        p.write_text("acls:\n  a: src 10.0.0.1\nhttp_access:\n  - allow b\n")
        with caplog.at_level(logging.ERROR), pytest.raises(exceptions.CommandError, match=(
                rf"policy.reload: kept the previous policy: {re.escape(str(p))}:4: http_access: unknown acl 'b'")):
            tctx.command(ac.reload)  # the caller (mitmweb, a script) learns it was refused
        assert f"{p}:4: http_access: unknown acl 'b'" in caplog.text and "last good policy" in caplog.text
        f = flow("/two")
        ac.requestheaders(f)
        assert f.response.status_code == 403  # still the good one


def test_denied_raw_stream_sends_nothing():
    ac = acl.AccessControl()
    with taddons.context(ac):
        f = tflow.ttcpflow()
        f.metadata[meta.CODE] = "TCP_DENIED"
        ac.tcp_message(f)
        assert f.messages[-1].content == b""


def test_the_dns_answers_kept_for_the_rules_stay_bounded(monkeypatch):
    """A forward proxy meets any number of names and addresses: forward and reverse answers alike are
    cached for the rules, and the cache never holds more than DNS_MAX of them."""
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()

        async def no_name(addr, flags=0):  # what a resolver answers for an address without a name
            return addr[0], "0"

        async def one_address(host, port, **kw):
            return [(2, 1, 6, "", ("192.0.2.1", port))]
        monkeypatch.setattr(loop, "getnameinfo", no_name)
        monkeypatch.setattr(loop, "getaddrinfo", one_address)
        ac = acl.AccessControl()
        ac.policy = type("P", (), {"uses_rdns": True, "uses_dst": True})()
        for i in range(acl.DNS_MAX + 50):
            assert await ac._reverse(f"10.0.{i // 256}.{i % 256}") == ("none",)
            assert len(ac.dns) <= acl.DNS_MAX
        for i in range(acl.DNS_MAX + 50):
            req = acl.aclrules.Request(host=f"h{i}.example", port=80)
            await ac._resolve(req)
            assert req.dst_ips == ("192.0.2.1",) and len(ac.dns) <= acl.DNS_MAX
    asyncio.run(main())


@pytest.mark.parametrize("hook", ["requestheaders", "http_connect"])
def test_an_error_while_deciding_denies_the_request(tmp_path, caplog, hook):
    """Access control fails closed: left to mitmproxy, an error in a hook is logged and the request
    goes on upstream."""
    (tmp_path / "p.yaml").write_text(POLICY.format(path="no"))
    ac = acl.AccessControl()
    with taddons.context(ac) as tctx:
        tctx.configure(ac, policy=str(tmp_path / "p.yaml"))

        def broken(req):
            raise ValueError("a bug")
        ac.policy.verdict = broken
        f = flow("/ok", method="CONNECT" if hook == "http_connect" else "GET")
        with caplog.at_level(logging.ERROR):
            assert getattr(ac, hook)(f) is None
        assert f.response.status_code == 403 and f.response.headers["X-Squid-Error"] == "ERR_ACCESS_DENIED 0"
        assert f.metadata[meta.CODE] == "TCP_DENIED" and f.metadata[meta.LOCAL] == "acl"
        assert f.metadata[meta.ACL]["action"] == "deny" and f.metadata[meta.ACLS] == []
        assert f.client_conn not in ac.tunnels
        assert "access control failed (ValueError: a bug); denied" in caplog.text


def test_an_error_after_a_dns_lookup_or_on_a_raw_stream_denies_too(tmp_path, monkeypatch):
    """The asynchronous path (a dst acl needs the host's addresses) and raw TCP streams fail closed."""
    import asyncio
    (tmp_path / "p.yaml").write_text("acls:\n  lan: dst 10.0.0.0/8\nhttp_access:\n  - allow lan\n  - allow localhost\n")
    ac = acl.AccessControl()

    async def main():
        async def one_address(host, port, **kw):
            return [(2, 1, 6, "", ("10.1.2.3", port))]
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", one_address)
        with taddons.context(ac) as tctx:
            tctx.configure(ac, policy=str(tmp_path / "p.yaml"))

            def broken(*a):
                raise ValueError("a bug")
            monkeypatch.setattr(ac.policy, "verdict", broken)
            monkeypatch.setattr(ac.policy, "check", broken)
            f = flow("/x", host="lan.example")
            f.request.headers["Expect"] = "100-continue"
            pending = ac.requestheaders(f)
            assert pending is not None  # the lookup first
            await pending
            assert f.response.status_code == 403 and f.metadata[meta.CODE] == "TCP_DENIED"
            assert "expect" not in f.request.headers  # the body is not invited
            t = tflow.ttcpflow()
            t.server_conn.address = ("10.1.2.3", 5222)
            await ac.tcp_start(t)
            assert t.metadata[meta.CODE] == "TCP_DENIED" and t.metadata[meta.ACL]["rule"] == "an error in access control"
            assert t.client_conn in ac.denied
    asyncio.run(main())


def test_http2_requests_show_their_host_and_their_cookies_to_req_header_acls(tmp_path):
    """HTTP/2 has no Host field (its :authority stands for it) and may send each cookie as a field of its own
    (RFC 9113 8.2.3): the acls see them as an HTTP/1 request shows them, and as the origin gets them."""
    (tmp_path / "p.yaml").write_text(
        "acls:\n  evil: req_header Host ^evil\n  b2: req_header Cookie (^|;\\s*)b=2(;|$)\n"
        "http_access:\n  - deny evil\n  - deny b2\n  - allow all\n")
    ac = acl.AccessControl()
    with taddons.context(ac) as tctx:
        tctx.configure(ac, policy=str(tmp_path / "p.yaml"))
        for authority, cookies, denied in ((b"evil.example", [], True), (b"good.example", ["a=1", "b=2"], True),
                                           (b"good.example", ["a=1", "b=3"], False)):
            f = flow()
            f.request.http_version = "HTTP/2.0"
            f.request.data.authority = authority
            f.request.headers["host"] = "good.example"  # a host field too: :authority wins (RFC 9113 8.3.1)
            for c in cookies:
                f.request.headers.add("cookie", c)
            ac.requestheaders(f)
            assert (f.response is not None) == denied, (authority, cookies)
            assert f.request.headers["host"] == "good.example"  # the request itself is left as it is


@pytest.mark.parametrize("hook", ["server_connect", "tls_clienthello"])
def test_an_error_deciding_a_connection_before_any_flow_denies_it_and_is_logged_as_a_denial(tmp_path, caplog, hook):
    """A SOCKS5 connection judged at server_connect, or a TLS ClientHello: an error while deciding
    closes it as a denial would, with the TCP flow the access log writes TCP_DENIED from."""
    import asyncio
    import types
    from mitmproxy import tls
    from mitmproxy.proxy import context, server_hooks
    from mitmproxy.proxy.mode_specs import ProxyMode
    (tmp_path / "p.yaml").write_text("http_access:\n  - allow all\n")
    ac = acl.AccessControl()
    seen = []

    class Recorder:
        def tcp_start(self, flow):
            seen.append(dict(flow.metadata))

    async def main():
        with taddons.context(ac, Recorder()) as tctx:
            tctx.configure(ac, policy=str(tmp_path / "p.yaml"))

            def broken(*a):
                raise ValueError("a bug")
            ac.policy.precheck = ac.policy.check = broken
            client, server = tflow.tclient_conn(), tflow.tserver_conn()
            client.proxy_mode = ProxyMode.parse("socks5")
            server.address = ("10.1.2.3", 5222)
            if hook == "server_connect":
                data = server_hooks.ServerConnectionHookData(client=client, server=server)
                await ac.server_connect(data)
                assert data.server.error == "denied by an error in access control"
            else:
                ctx = context.Context(client, tctx.options)
                ctx.server = server
                data = tls.ClientHelloData(ctx, types.SimpleNamespace(sni="chat.example"))  # all the hook reads of it
                await ac.tls_clienthello(data)
                assert data.ignore_connection
            assert client in ac.denied
            assert [(m[meta.CODE], m[meta.ACL]["rule"]) for m in seen] == [("TCP_DENIED", "an error in access control")]
    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert "access control failed (ValueError: a bug); denied" in caplog.text


def test_the_policy_watch_sees_new_included_files_and_the_fix_of_a_refused_include(tmp_path, caplog):
    """The watch of a squid.conf covers what its includes name: a file added where a glob looks, and
    a file that a refused version included (missing, or broken), whose fix is then applied."""
    import asyncio
    import os

    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-acls.conf").write_text("acl one urlpath_regex ^/one\nacl two urlpath_regex ^/two\n")
    conf = tmp_path / "squid.conf"
    conf.write_text("include conf.d/*.conf\nhttp_access deny one\nhttp_access allow localhost\n")

    def code(ac, path):
        f = flow(path)
        ac.requestheaders(f)
        return f.response.status_code if f.response else 200

    def touch(p, n):  # a new mtime whatever the file system's resolution
        os.utime(p, ns=(os.stat(p).st_mtime_ns + n * 10**9,) * 2)

    async def main(ac):
        watch = asyncio.get_running_loop().create_task(ac._watch())
        try:
            assert code(ac, "/two") == 200
            (tmp_path / "conf.d" / "20-deny.conf").write_text("http_access deny two\n")
            touch(tmp_path / "conf.d", 1)
            await asyncio.sleep(0.5)
            assert code(ac, "/two") == 403  # the file added beside the glob's others
            conf.write_text("include extra.conf\n" + conf.read_text())  # not there yet: refused
            touch(conf, 2)
            await asyncio.sleep(0.5)
            assert "last good policy" in caplog.text and code(ac, "/two") == 403
            assert caplog.text.count("policy rejected") == 1  # not retried while nothing changes
            (tmp_path / "extra.conf").write_text("acl three urlpath_regex ^/three\nhttp_access deny three\n")
            await asyncio.sleep(0.5)
            assert code(ac, "/three") == 403 and code(ac, "/two") == 403
        finally:
            watch.cancel()

    ac = acl.AccessControl()
    with taddons.context(ac) as tctx:
        tctx.configure(ac, policy=str(conf), policy_watch="0.1")
        with caplog.at_level(logging.ERROR):
            asyncio.run(main(ac))


def test_a_list_file_named_in_an_included_file_is_read_from_its_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "sites.txt").write_text(".blocked.test\n")
    (tmp_path / "sub" / "rules.conf").write_text('acl bad dstdomain "sites.txt"\nhttp_access deny bad\n')
    conf = tmp_path / "squid.conf"
    conf.write_text("include sub/rules.conf\nhttp_access allow localhost\n")
    ac = acl.AccessControl()
    with taddons.context(ac) as tctx:
        tctx.configure(ac, policy=str(conf))
        f = flow("/", host="www.blocked.test")
        ac.requestheaders(f)
        assert f.response.status_code == 403
