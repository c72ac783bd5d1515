"""Squid's cache manager pages (addons/manager.py), through a real mitmdump and curl, and beside a real Squid."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy.test import taddons, tflow

from addons import manager
from harness import ROOT, curl, stop_group
from squid import common_conf, start_squid_on_free_port

MGR = "/squid-internal-mgr"


def fetch(*args: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of a curl request."""
    r = curl("-s", "-i", *args)
    head, _, body = r.stdout.decode("utf-8", "replace").partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def field(page: str, label: str) -> str:
    m = re.search(rf"^\s*{re.escape(label)}\s*:?\s*\t?(.*)$", page, re.M)
    assert m, f"{label!r} not in:\n{page}"
    return m.group(1).strip()


def test_pages_at_the_proxys_own_address(start_proxy, origin, tmp_path):
    proxy = start_proxy(options={"cache_dir": str(tmp_path / "cache")})
    origin.route("/c", lambda seen: (200, {"Cache-Control": "max-age=600", "Content-Type": "text/plain"}, b"x" * 3000))
    for _ in range(2):  # a miss, stored, then a hit
        assert curl("-x", proxy.url, f"{origin.url}/c").stdout == b"x" * 3000
    assert origin.hits["/c"] == 1

    # origin-form, as squidclient sends it, straight to the proxy's port
    status, headers, menu = fetch(f"{proxy.url}{MGR}/menu")
    assert status == 200 and headers["content-type"] == "text/plain;charset=utf-8"
    assert [line.split()[0] for line in menu.splitlines()] == ["menu", "info", "storedir"]
    assert "no-store" in headers["cache-control"]

    # absolute-form through the proxy, to one of its own addresses
    status, _, info = fetch("-x", proxy.url, f"http://localhost:{proxy.port}{MGR}/info")
    assert status == 200
    assert info.startswith("Squid Object Cache: Version relais ")
    assert field(info, "Hits as % of all requests") == "50.0%"
    assert field(info, "Memory hits as % of hit requests") == "100.0%"
    assert int(field(info, "Storage Mem size").split()[0]) >= 2  # the 3000-byte body and its headers
    assert int(re.search(r"(\d+) Hot Object Cache Items", info).group(1)) == 1
    assert int(field(info, "Number of file desc currently in use")) > 0
    assert float(field(info, "UP Time").split()[0]) > 0

    status, _, storedir = fetch(f"{proxy.url}{MGR}/storedir")
    assert status == 200
    assert field(storedir, "Store Directory #0 (diskcache)") == str(tmp_path / "cache")
    assert field(storedir, "State") == "on"
    assert field(storedir, "Maximum Swap Size") == f"{3200 * 1024} KB"

    # each is logged as Squid logs a manager page: a miss answered by the proxy itself, no origin
    for page in ("menu", "info", "storedir"):
        line = proxy.log_line(f"{MGR}/{page} ").split()
        assert line[3] == "TCP_MISS/200" and line[8:] == ["HIER_NONE/-", "text/plain"], line
    # the cache neither stored them (still one object) nor answered them (each made anew)
    _, _, again = fetch(f"{proxy.url}{MGR}/info")
    assert int(re.search(r"(\d+) Hot Object Cache Items", again).group(1)) == 1
    assert field(again, "UP Time") != field(info, "UP Time")


def test_squidclient_reads_them(proxy):
    """Squid's own client, given the page's URL (its mgr: shorthand sends a cache_object:// URL, which
    mitmproxy's HTTP parser refuses with a 400 before any addon sees it)."""
    r = subprocess.run(["squidclient", "-h", "127.0.0.1", "-p", str(proxy.port),
                        f"http://127.0.0.1:{proxy.port}{MGR}/info"], capture_output=True, timeout=20)
    out = r.stdout.decode()
    assert r.returncode == 0 and out.startswith("HTTP/1.1 200 OK\r\n"), out
    assert "\r\n\r\nSquid Object Cache: Version relais " in out and "UP Time:" in out
    r = subprocess.run(["squidclient", "-h", "127.0.0.1", "-p", str(proxy.port), "mgr:info"],
                       capture_output=True, timeout=20)
    assert r.stdout.startswith(b"HTTP/1.1 400 ")  # the documented limit: if it changes, so must the README


def test_an_unknown_page_is_squids_404(proxy):
    status, headers, body = fetch(f"{proxy.url}{MGR}/nosuch")
    assert status == 404 and headers["x-squid-error"] == "ERR_INVALID_URL 0"
    assert "no such cache manager page: nosuch" in body
    r = curl("-s", "-i", f"{proxy.url}{MGR}/")
    assert r.stdout.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert " TCP_MISS/404 " in proxy.log_line(f"{MGR}/nosuch ")


def test_the_access_policy_decides_who_reads_them(start_proxy, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("http_access:\n  - deny manager\n  - allow all\n")
    proxy = start_proxy(options={"policy": str(policy)})
    status, headers, _ = fetch(f"{proxy.url}{MGR}/info")
    assert status == 403 and headers["x-squid-error"] == "ERR_ACCESS_DENIED 0"
    assert " TCP_DENIED/403 " in proxy.log_line(f"{MGR}/info ")


def test_the_default_policy_keeps_them_to_localhost(start_proxy):
    """Squid's default rules: `allow localhost manager`, `deny manager`. 127.0.0.2 is loopback, not localhost."""
    proxy = start_proxy(options={"policy": str(ROOT / "policies" / "default.yaml")})
    assert fetch(f"{proxy.url}{MGR}/menu")[0] == 200
    status, headers, body = fetch("--interface", "127.0.0.2", f"{proxy.url}{MGR}/menu")
    assert status == 403 and "http_access deny manager" in body
    assert " TCP_DENIED/403 " in proxy.log_line("127.0.0.2 ")


def test_a_host_header_cannot_hide_them_from_the_policy(start_proxy):
    """Through SOCKS5 the acls read the URL the Host header makes; with Host: x/y the `manager` acl would
    not see the manager's URL, and a client it denies would get the pages. (The test policy denies the
    manager to 127.0.0.2 and allows it everything else; lazily, the request reaches the hooks.)"""
    proxy = start_proxy(modes=("regular", "socks5"), options={"connection_strategy": "lazy"})
    url = f"http://127.0.0.1:{proxy.port}{MGR}/info"
    socks = ("--socks5", f"127.0.0.1:{proxy.ports[1]}")
    assert fetch(*socks, url)[0] == 200  # localhost: allowed
    status, _, body = fetch("--interface", "127.0.0.2", *socks, url)
    assert status == 403 and "http_access deny manager" in body
    for host in ("x/y", f"127.0.0.1:{proxy.port}/z"):
        status, _, body = fetch("--interface", "127.0.0.2", *socks, "-H", f"Host: {host}", url)
        assert status == 400 and "Squid Object Cache" not in body, (host, status)


def test_pages_of_another_server_are_its_own(proxy, origin):
    """Only the proxy's own address has the manager: the same path elsewhere goes to that server."""
    assert curl("-x", proxy.url, f"{origin.url}{MGR}/info").stdout == f"hello {MGR}/info".encode()
    assert origin.hits[f"{MGR}/info"] == 1


def test_reverse_mode_passes_the_path_to_the_backend(start_proxy, origin):
    proxy = start_proxy(modes=(f"reverse:{origin.url}",))
    assert curl(f"{proxy.url}{MGR}/info").stdout == f"hello {MGR}/info".encode()


def test_alone_it_answers_loopback_clients_without_a_cache(start_proxy):
    proxy = start_proxy(script="addons/manager.py")
    status, _, info = fetch(f"{proxy.url}{MGR}/info")
    assert status == 200 and "Cache information" not in info and "UP Time" in info
    status, _, storedir = fetch(f"{proxy.url}{MGR}/storedir")
    assert status == 200 and "No cache is loaded." in storedir


def test_alone_it_refuses_other_clients():
    """Without an access policy (no acl addon judged the request), only loopback clients get the pages."""
    addon = manager.Manager()
    with taddons.context(addon):
        addon.listeners.known = frozenset({("127.0.0.1", 3128)})  # as mitmproxy's proxyserver reports it
        for client, status in ((("10.1.2.3", 50000), 403), (("::1", 50000), 200), (("127.0.0.1", 50000), 200)):
            f = tflow.tflow()
            f.request.host, f.request.port, f.request.path = "127.0.0.1", 3128, f"{MGR}/menu"
            f.client_conn.peername = client
            addon.requestheaders(f)
            assert f.response.status_code == status, client
            assert f.metadata["relais.local"] == "manager"
        f = tflow.tflow()
        f.request.host, f.request.port, f.request.path = "127.0.0.1", 8080, f"{MGR}/menu"  # not this proxy
        addon.requestheaders(f)
        assert f.response is None


def squid_conf(tmp: Path, port: int) -> str:
    return f"""
http_port 127.0.0.1:{port}
{common_conf(tmp)}
http_access allow localhost manager
http_access deny manager
http_access allow localhost
http_access deny all
"""


def test_answers_as_squid_answers(proxy):
    """The same requests to a real Squid and to Relais: the same statuses, content types, log fields,
    and the page layouts Squid's tools read (menu lines; info's and storedir's labels)."""
    assert os.geteuid() == 0, "the Squid differential test runs Squid as root (cache_effective_user proxy)"
    tmp = Path(tempfile.mkdtemp(prefix="relais-squid-mgr-"))
    os.chmod(tmp, 0o755)
    squid = None
    try:
        squid, port = start_squid_on_free_port(tmp, lambda port: squid_conf(tmp, port))
        pages = {}
        for who, base in (("squid", f"http://127.0.0.1:{port}"), ("relais", proxy.url)):
            for page in ("menu", "info", "storedir", "nosuch"):
                status, headers, body = fetch(f"{base}{MGR}/{page}")
                pages[who, page] = (status, headers["content-type"].split(";")[0], body)
        for page in ("menu", "info", "storedir", "nosuch"):
            assert pages["squid", page][:2] == pages["relais", page][:2], page
        squid_menu = {line.split()[0]: line for line in pages["squid", "menu"][2].splitlines()}
        for line in pages["relais", "menu"][2].splitlines():
            name = line.split()[0]
            assert line.split("\t")[1:] == squid_menu[name].split("\t")[1:], (line, squid_menu[name])
        for label in ("Start Time", "Current Time", "Hits as % of all requests", "Storage Swap size",
                      "Storage Mem size", "Mean Object Size", "UP Time", "CPU Time",
                      "Maximum number of file descriptors", "StoreEntries"):
            assert label in pages["squid", "info"][2] and label in pages["relais", "info"][2], label
        for label in ("Store Entries", "Maximum Swap Size", "Current Store Swap Size", "Current Capacity"):
            assert field(pages["squid", "storedir"][2], label) and field(pages["relais", "storedir"][2], label)

        def logged(lines: list[str]) -> list[tuple]:
            out = []
            for line in lines:
                f = line.split()
                if MGR in f[6]:
                    out.append((f[3], f[5], urlsplit(f[6]).path, f[8].split("/")[0], f[9]))
            return out
        squid_lines = proxy.wait_lines(MGR, 4, path=tmp / "access.log")
        assert logged(proxy.wait_lines(MGR, 4)) == logged(squid_lines)
    finally:
        if squid:
            stop_group(squid)
        shutil.rmtree(tmp, ignore_errors=True)
