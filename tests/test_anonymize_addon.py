"""addons/anonymize.py in-process (mitmproxy's taddons): options, policy loading and reloading."""
from __future__ import annotations

import os
import shutil

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import upstream_auth
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow

from harness import ROOT

from addons import anonymize, meta, policyfile

SHIPPED = ROOT / "policies" / "anonymize.yaml"


@pytest.fixture
def addon():
    a = anonymize.Anonymize()
    with taddons.context(a, upstream_auth.UpstreamAuth()) as tctx:
        tctx.configure(a, anonymize_policy="policies/anonymize.yaml")  # as mitmdump does at start
        a.tctx = tctx
        yield a


def flow(mode="regular", headers=()):
    f = tflow.tflow()
    f.client_conn.proxy_mode = mode_specs.ProxyMode.parse(mode)
    f.client_conn.peername = ("127.0.0.23", 50000)
    for k, v in headers:
        f.request.headers.add(k, v)
    return f


def test_defaults(addon):
    assert addon.tctx.options.anonymize == "auto"
    assert addon.path == SHIPPED or addon.path.resolve() == SHIPPED
    assert addon.tctx.options.anonymize_backend is False


def test_relative_policy_resolves_against_project_root(addon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the policy is not in this cwd
    addon.tctx.configure(addon, anonymize_policy="policies/anonymize.yaml")
    assert addon.path == ROOT / "policies" / "anonymize.yaml"
    (tmp_path / "policies").mkdir()
    shutil.copy(SHIPPED, tmp_path / "policies" / "anonymize.yaml")
    addon.tctx.configure(addon, anonymize_policy=str(tmp_path / "policies" / "anonymize.yaml"))
    addon.tctx.configure(addon, anonymize_policy="policies/anonymize.yaml")
    assert addon.path == anonymize.Path("policies/anonymize.yaml")  # the cwd's copy wins


def test_bad_option_values(addon, tmp_path):
    with pytest.raises(exceptions.OptionsError, match=r"anonymize: 'stealth' is not a level; use one of auto"):
        addon.tctx.configure(addon, anonymize="stealth")
    with pytest.raises(exceptions.OptionsError, match=r"anonymize_policy: .*nothing.yaml: cannot read"):
        addon.tctx.configure(addon, anonymize_policy=str(tmp_path / "nothing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(SHIPPED.read_text().replace("    via: delete", "    via: sometimes"))
    with pytest.raises(exceptions.OptionsError) as e:
        addon.tctx.configure(addon, anonymize_policy=str(bad))
    line = SHIPPED.read_text().split("    via: delete")[0].count("\n") + 1
    assert str(e.value).startswith(f"anonymize_policy: {bad}:{line}: levels.elite.via: 'sometimes'")


def test_levels_per_mode(addon):
    for mode, level in (("regular", "elite"), ("socks5", "elite"), ("reverse:http://127.0.0.1:1", "transparent"),
                        ("upstream:http://127.0.0.1:1", "elite"), ("transparent", "elite")):
        f = flow(mode, [("X-Forwarded-For", "10.1.2.3")])
        addon.requestheaders(f)
        assert f.metadata[meta.ANONYMIZE] == level
        assert ("x-forwarded-for" in f.request.headers) == (level == "transparent")
    addon.tctx.configure(addon, anonymize="paranoid")
    f = flow("reverse:http://127.0.0.1:1")
    addon.requestheaders(f)
    assert f.metadata[meta.ANONYMIZE] == "paranoid"


def test_flows_answered_earlier_are_skipped(addon):
    f = flow(headers=[("Via", "1.0 x")])
    f.response = tflow.tresp()
    addon.requestheaders(f)
    assert meta.ANONYMIZE not in f.metadata and f.request.headers["via"] == "1.0 x"


def test_upstream_auth_survives(addon):
    addon.tctx.configure(addon, upstream_auth="up:stream")
    f = flow("upstream:http://127.0.0.1:1", [("Proxy-Authorization", "Basic dXA6c3RyZWFt")])
    addon.requestheaders(f)
    assert f.request.headers["Proxy-Authorization"] == "Basic dXA6c3RyZWFt"
    f = flow("regular", [("Proxy-Authorization", "Basic dXA6c3RyZWFt")])
    addon.requestheaders(f)
    assert "Proxy-Authorization" not in f.request.headers


def test_reload_command_keeps_last_good(addon, tmp_path):
    pol = tmp_path / "anon.yaml"
    text = SHIPPED.read_text()
    pol.write_text(text.replace("visible_hostname: null", "visible_hostname: one.test"))
    addon.tctx.configure(addon, anonymize_policy=str(pol), anonymize="transparent")
    f = flow()
    addon.requestheaders(f)
    assert f.request.headers["Via"] == "1.1 one.test (relais)"

    pol.write_text(text.replace("visible_hostname: null", "visible_hostname: two.test"))
    addon.tctx.command(addon.reload)
    f = flow()
    addon.requestheaders(f)
    assert f.request.headers["Via"] == "1.1 two.test (relais)"

    pol.write_text(text.replace("visible_hostname: null", "visible_hostname: three.test\nlevels: {}"))
    with pytest.raises(exceptions.CommandError, match=rf"kept the previous policy: {pol}:\d+: duplicate key"):
        addon.tctx.command(addon.reload)
    pol.write_text("[" * 5000)  # what the YAML parser cannot take is a refused policy too, not an addon error
    with pytest.raises(exceptions.CommandError, match=rf"kept the previous policy: {pol}: nested too deep"):
        addon.tctx.command(addon.reload)
    f = flow()
    addon.requestheaders(f)
    assert f.request.headers["Via"] == "1.1 two.test (relais)"


def test_file_change_is_picked_up(addon, tmp_path, monkeypatch):
    monkeypatch.setattr(policyfile, "CHECK_EVERY", 0.0)
    pol = tmp_path / "anon.yaml"
    text = SHIPPED.read_text()
    pol.write_text(text.replace("visible_hostname: null", "visible_hostname: one.test"))
    addon.tctx.configure(addon, anonymize_policy=str(pol), anonymize="anonymous")
    pol.write_text(text.replace("visible_hostname: null", "visible_hostname: changed.test"))
    os.utime(pol, ns=(1, 10**18))
    f = flow()
    addon.requestheaders(f)
    assert f.request.headers["Via"] == "1.1 changed.test (relais)"
    pol.write_text("levels: [")
    f = flow()
    addon.requestheaders(f)   # broken: logged, last good kept
    assert f.request.headers["Via"] == "1.1 changed.test (relais)"
    assert addon.last_error.startswith(f"{pol}:1: not valid YAML")


def test_backend_headers_only_in_reverse_mode_when_enabled(addon):
    def resp(mode):
        f = flow(mode)
        addon.requestheaders(f)
        f.response = tflow.tresp(headers=[(b"Server", b"nginx/1.2"), (b"X-Powered-By", b"PHP/8"),
                                          (b"Content-Type", b"text/plain")])
        addon.responseheaders(f)
        return f.response.headers
    assert resp("reverse:http://127.0.0.1:1")["Server"] == "nginx/1.2"
    addon.tctx.configure(addon, anonymize_backend=True)
    h = resp("reverse:http://127.0.0.1:1")
    assert "Server" not in h and "X-Powered-By" not in h and h["Content-Type"] == "text/plain"
    assert resp("regular")["Server"] == "nginx/1.2"


def test_remembered_edits_still_depend_on_client_and_headers(addon):
    """Edits are remembered per (headers, client, host...): a repeat gets the same answer, a
    different client or header does not get another request's."""
    addon.tctx.configure(addon, anonymize="transparent")
    seen = []
    for client, xff in [("127.0.0.23", None), ("127.0.0.23", None), ("127.0.0.99", None),
                        ("127.0.0.23", "10.1.1.1")]:
        f = flow(headers=[("X-Forwarded-For", xff)] if xff else ())
        f.client_conn.peername = (client, 50000)
        addon.requestheaders(f)
        seen.append(f.request.headers["X-Forwarded-For"])
    assert seen == ["127.0.0.23", "127.0.0.23", "127.0.0.99", "10.1.1.1, 127.0.0.23"]
    assert len(addon.memo) == 3


def test_http2_requests_to_two_names_on_one_address_get_each_their_own_edits(addon):
    """The edits are remembered per request facts; HTTP/2's :authority (no header field) is one of them:
    a cookie for a stripped domain must not pass because another name on the same address was seen first."""
    addon.tctx.configure(addon, anonymize="paranoid")
    out = []
    for name in (b"shop.example", b"www.facebook.com", b"shop.example"):
        f = flow(headers=[("cookie", "sid=abc")])
        f.request.http_version = "HTTP/2.0"
        f.request.host, f.request.data.authority = "127.0.0.1", name
        f.request.headers.pop("host", None)
        addon.requestheaders(f)
        out.append(f.request.headers.get("cookie"))
    assert out == ["sid=abc", None, "sid=abc"]
