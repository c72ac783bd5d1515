"""The suite's composition: every addon loads alone, all.py keeps the documented order."""
from __future__ import annotations

import re

import pytest

from harness import ROOT, curl

ADDON_MODULES = sorted(
    p.stem for p in (ROOT / "addons").glob("*.py")
    if p.stem != "all" and re.search(r"^addons = \[", p.read_text(), re.M)
)


def test_there_are_addons_to_load():
    assert {"accesslog", "errors", "acl", "cache", "anonymize"} <= set(ADDON_MODULES)


@pytest.mark.parametrize("module", ADDON_MODULES)
def test_each_addon_loads_alone_and_relays(start_proxy, origin, module, tmp_path):
    options = {"cache_dir": str(tmp_path / "cache")} if module == "cache" else {}
    proxy = start_proxy(script=f"addons/{module}.py", options=options)
    r = curl("-x", proxy.url, f"{origin.url}/alone-{module}")
    assert r.stdout == f"hello /alone-{module}".encode(), proxy.text()
    assert "Traceback" not in proxy.text()


def documented_order() -> list[str]:
    text = (ROOT / "addons" / "README.md").read_text()
    section = text.split("## Pipeline order", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| \d+ \| [^|]+\| `(\w+)\.py` \|", section, re.M)


def suite_order() -> list[str]:
    from addons import all as suite
    return [type(a).__module__.rsplit(".", 1)[-1] for a in suite.pipeline]


def test_all_py_follows_the_documented_pipeline():
    assert suite_order() == documented_order()
    assert suite_order()[-1] == "accesslog"  # last: it sees every verdict


def test_every_metadata_key_in_code_is_documented():
    from addons import meta
    doc = (ROOT / "addons" / "README.md").read_text()
    keys = [v for k, v in vars(meta).items() if k.isupper() and isinstance(v, str) and v.startswith("relais.")]
    assert keys
    for key in keys:
        assert f"`{key}`" in doc, f"{key} is not in addons/README.md"
    # and addons use keys only through meta's constants or documented names
    for path in (ROOT / "addons").glob("*.py"):
        for literal in re.findall(r"metadata(?:\[|\.get\(|\.setdefault\()\s*[\"'](relais\.\w+)", path.read_text()):
            assert f"`{literal}`" in doc, f"{path.name} uses undocumented metadata key {literal}"


NOT_INSTALLED = """
import sys
# As if Relais were not pip-installed: drop the editable install's import hook.
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in repr(f)]
from mitmproxy.tools.main import mitmdump
sys.argv[0] = "mitmdump"
mitmdump()
"""


def test_all_py_works_without_the_project_installed(start_proxy, origin, tmp_path):
    import sys
    p = start_proxy(program=[sys.executable, "-c", NOT_INSTALLED], options={"cache_dir": str(tmp_path / "cache")})
    r = curl("-x", p.url, f"{origin.url}/uninstalled")
    assert r.stdout == b"hello /uninstalled", p.text()
    assert "Traceback" not in p.text()
    assert "deprecated" not in p.text(), "all.py names a hook mitmproxy warns about"


def stopped_output(tmp_path, **kw) -> str:
    """Start all.py as Proxy(**kw) would, expect it to stop by itself with an error: its output."""
    from harness import Proxy
    proxy = Proxy(tmp_path, wait=False, **kw)
    try:
        rc = proxy.proc.wait(30)
    finally:
        proxy.stop()
    assert rc != 0
    return proxy.text()


def test_an_option_given_twice_stops_the_proxy_instead_of_running_it_open(tmp_path):
    """mitmproxy 11 loads a script whose option is set twice without applying any option or
    calling any hook; Relais must not then serve as a proxy without access control."""
    out = stopped_output(tmp_path, options={"cache_dir": str(tmp_path / "a")},
                         args=["--set", f"cache_dir={tmp_path / 'b'}"])
    assert "never applied its options (--set cache_dir: " in out


def test_an_option_value_mitmproxy_cannot_read_is_named_when_the_proxy_stops(tmp_path):
    """mitmproxy 11 drops `--set cache_dir_size=1GB` (an integer option) as it drops an option given
    twice: Relais stops, naming the option and the value."""
    out = stopped_output(tmp_path, options={"cache_dir_size": "1GB"})
    stopped = [line for line in out.splitlines() if "Relais stopped" in line]
    assert stopped and "(--set cache_dir_size: " in stopped[0] and "integer: 1gb)" in stopped[0].lower(), stopped


def test_a_bad_option_at_start_stops_the_proxy_with_its_message_not_a_member_traceback(tmp_path):
    out = stopped_output(tmp_path, options={"cache_mem": "-5"})
    assert "OptionsError: cache_mem: cannot read size '-5'" in out
    assert "cache.py" not in out and "parse_size" not in out  # the frames inside the addons say nothing more


def test_a_request_an_addon_fails_on_is_refused_and_logged_not_forwarded_unjudged(start_proxy, origin):
    """Fail closed: mitmproxy would skip the later addons of the script (anonymization, the cache, the
    log) and send the request on; the suite answers Squid's 500 and logs it, and the proxy goes on."""
    p = start_proxy(script="tests/addons_for_tests/broken_member.py")
    r = curl("-i", "-x", p.url, "-H", "X-Forwarded-For: 10.1.2.3", f"{origin.url}/break-here")
    assert r.stdout.startswith(b"HTTP/1.1 500") and b"ERR_GATEWAY_FAILURE" in r.stdout, r.stdout[:300]
    assert "/break-here" not in origin.hits
    assert p.wait_lines("/break-here", 1)[0].split()[3] == "NONE_NONE/500"
    assert "Addon error: a bug in some addon" in p.text()
    assert curl("-x", p.url, f"{origin.url}/fine").stdout == b"hello /fine"
    # an upload waiting on Expect: 100-continue gets the 500 at once, and sends none of its body
    r = curl("-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "--expect100-timeout", "60", "-x", p.url, "--data-binary", "@-",
             f"{origin.url}/break-upload", input_bytes=b"x" * 2_000_000)
    assert r.stdout == b"500 0"
    assert "/break-upload" not in origin.hits


def test_request_url_is_mitmproxys_url_with_ipv6_in_brackets():
    import itertools

    from mitmproxy import http
    from addons import meta
    for scheme, host, port, path in itertools.product(
            ["http", "https", "HTTP", "ftp", ""], ["example.com", "127.0.0.1", "::1", "xn--bcher-kva.example", "", "Ex.AMPLE"],
            [80, 443, 8080, 0, 65535], ["/", "/a?b=c&d", "*", "", "/\udcff%20é", "//x"]):
        req = http.Request(host, port, b"GET", scheme.encode(), b"", path.encode("utf-8", "surrogateescape"),
                           b"HTTP/1.1", http.Headers(), b"", None, 0, None)
        expected = req.url
        if host == "::1":  # mitmproxy writes http://::1:8080/; Squid and RFC 3986 3.2.2 write http://[::1]:8080/
            expected = req.url.replace("://::1", "://[::1]", 1)
        assert meta.request_url(req) == expected, (scheme, host, port, path)


def test_pretty_url_is_mitmproxys_with_ipv6_in_brackets():
    from mitmproxy import http
    from addons import meta
    for scheme, port, host_header, want in (
            ("http", 8080, "example.com", "http://example.com/p"),
            ("http", 8080, "example.com:8080", "http://example.com:8080/p"),
            ("https", 443, "Example.com:443", "https://Example.com/p"),
            ("http", 80, "[::1]:8080", "http://[::1]:8080/p"),
            ("https", 443, "[2001:db8::1]", "https://[2001:db8::1]/p"),
            ("http", 80, "example.com:", "http://example.com/p"),
            ("http", 80, None, "http://10.0.0.1/p")):
        headers = http.Headers(**({"host": host_header} if host_header else {}))
        req = http.Request("10.0.0.1", port, b"GET", scheme.encode(), b"", b"/p", b"HTTP/1.1", headers, b"", None, 0,
                           None)
        assert meta.pretty_url(req) == want, (host_header, meta.pretty_url(req))
        if "[" not in want and not (host_header or "").endswith(":"):  # (mitmproxy keeps an empty port's colon)
            assert want == req.pretty_url


def test_flows_can_be_saved_with_what_the_addons_put_in_their_metadata(start_proxy, origin, tmp_path):
    """mitmdump -w / mitmweb's Save write flow.metadata as plain data: a set there made every flow unsavable."""
    from mitmproxy import io
    saved = tmp_path / "flows"
    p = start_proxy(options={"save_stream_file": str(saved)})
    assert curl("-x", p.url, f"{origin.url}/saved").stdout == b"hello /saved"
    p.wait_lines("/saved", 1)
    p.stop()
    assert "Addon error" not in p.text(), p.text()[-2000:]
    with saved.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert [f.request.path for f in flows] == ["/saved"]
    assert "all" in flows[0].metadata["relais.acl_names"]
