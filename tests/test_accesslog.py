"""The access log: exact Squid field layout, formats, options, rotation, concurrency."""
from __future__ import annotations

import concurrent.futures
import logging
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import httpx
import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons

from addons import accesslog
from addons.accesslog import Record, format_common, format_squid, mime_of, strip_query
from harness import curl, fill_disk

# Squid 5's native layout, strictly: integer elapsed, integer bytes, 3-digit status.
STRICT = re.compile(
    r"^\d{9,10}\.\d{3} {1,6}\d+ [0-9a-fA-F.:]+ [A-Z_]+/\d{3} \d+ \S+ \S+ \S+ [A-Z_]+/\S+ \S+$")


def rec(**kw) -> Record:
    base = dict(end=1795745879.953, elapsed_ms=1, client="127.0.0.1", code="TCP_MISS", status=200,
                size=1391, method="GET", url="http://127.0.0.1:31081/1k", hier="HIER_DIRECT",
                peer="127.0.0.1", mime="application/octet-stream")
    base.update(kw)
    return Record(**base)


def test_squid_line_is_byte_for_byte_squids():
    assert format_squid(rec()) == (
        "1795745879.953      1 127.0.0.1 TCP_MISS/200 1391 GET http://127.0.0.1:31081/1k - "
        "HIER_DIRECT/127.0.0.1 application/octet-stream")
    assert format_squid(rec(elapsed_ms=5730, code="TCP_MISS", status=502, size=3410, url="http://nosuchhost.invalid/",
                            hier="HIER_NONE", peer="-", mime="text/html")) == (
        "1795745896.625   5730 127.0.0.1 TCP_MISS/502 3410 GET http://nosuchhost.invalid/ - HIER_NONE/- text/html"
        .replace("1795745896.625", "1795745879.953"))


def test_reference_lines_parse_with_the_strict_layout():
    """Every line a real Squid 5.7 wrote fits the layout our lines are checked against."""
    from harness import SHARED
    lines = (SHARED / "reference" / "squid-5.7-access.log").read_text().splitlines()
    assert len(lines) >= 20
    for line in lines:
        assert STRICT.match(line), line


def test_status_is_zero_padded_and_user_is_shown():
    line = format_squid(rec(code="NONE_NONE", status=0, size=0, method="-",
                            url="error:transaction-end-before-headers", hier="HIER_NONE", peer="-", mime="-"))
    assert " NONE_NONE/000 0 - error:transaction-end-before-headers - HIER_NONE/- -" in line
    assert " alice HIER_DIRECT/" in format_squid(rec(user="alice"))


def test_common_and_combined_formats():
    line = format_common(rec(user="bob"))
    assert re.match(r'^127\.0\.0\.1 - bob \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                    r'"GET http://127\.0\.0\.1:31081/1k HTTP/1\.1" 200 1391 TCP_MISS:HIER_DIRECT$', line)
    combined = format_common(rec(referer="http://a/", agent="curl/8"), combined=True)
    assert combined.endswith('200 1391 "http://a/" "curl/8" TCP_MISS:HIER_DIRECT')


def test_query_terms_are_stripped_like_squid():
    assert strip_query("http://h/1k?user=alice&token=secret") == "http://h/1k?"
    assert strip_query("http://h/1k") == "http://h/1k"


@pytest.mark.parametrize("value,expected", [
    ("text/html; charset=utf-8", "text/html"), ("text/html;charset=utf-8", "text/html"),
    ("application/json", "application/json"), ("", "-"),
])
def test_mime_type_without_parameters(value, expected):
    assert mime_of({"content-type": value} if value else {}) == expected


@pytest.mark.parametrize("option,value", [("logformat", "apache"), ("logfile_rotate", -1), ("access_log", "  ")])
def test_bad_option_values_are_refused_by_name(option, value, tmp_path):
    addon = accesslog.AccessLog()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, access_log=str(tmp_path / "a.log"))
        with pytest.raises(exceptions.OptionsError, match=option):
            tctx.configure(addon, **{option: value})
        addon.done()


def test_unwritable_access_log_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    addon = accesslog.AccessLog()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="access_log"):
            tctx.configure(addon, access_log=str(tmp_path / "file" / "access.log"))


def test_what_a_client_or_an_origin_chose_cannot_forge_fields_or_reach_a_terminal():
    """Control characters and spaces in the native format are %-encoded as Squid writes them."""
    line = format_squid(rec(method="G\x1b[31mET", url="http://h/a b\x00\x7f\n\u2028\x85", user="al ice",
                            peer="p\tq", mime="text/\x1b[2J"))
    assert line == ("1795745879.953      1 127.0.0.1 TCP_MISS/200 1391 G%1B[31mET "
                    "http://h/a%20b%00%7F%0A%E2%80%A8%C2%85 al%20ice HIER_DIRECT/p%09q text/%1B[2J")
    assert STRICT.match(line)
    # a raw byte that is a C1 control (kept by mitmproxy as a lone surrogate) is encoded too
    assert " http://h/%9B\udce9 " in format_squid(rec(url="http://h/\udc9b\udce9"))


def test_apache_fields_are_escaped_as_apache_does_so_that_no_field_can_be_forged():
    agent = 'evil" 200 999 "-" "fake\x1b[2J\\'
    line = format_common(rec(method="G ET", url='http://h/"x\\', user="a b", referer="r\n", agent=agent),
                         combined=True)
    assert line.startswith(r'127.0.0.1 - a\x20b [')
    assert r'"G\x20ET http://h/\"x\\ HTTP/1.1" 200 1391 "r\n" "evil\" 200 999 \"-\" \"fake\x1b[2J\\" ' in line
    quoted = r'"((?:[^"\\]|\\.)*)"'
    m = re.match(rf'^(\S+) - (\S+) \[[^]]+\] {quoted} (\d+) (\d+) {quoted} {quoted} (\S+)$', line)
    assert m and m.group(4, 5, 8) == ("200", "1391", "TCP_MISS:HIER_DIRECT")
    assert m.group(7) == r'evil\" 200 999 \"-\" \"fake\x1b[2J\\'  # the agent whole, one field


# --- end to end -------------------------------------------------------------------

def test_access_log_none_disables_it(start_proxy, origin):
    proxy = start_proxy(options={"access_log": "none"})
    assert curl("-x", proxy.url, f"{origin.url}/x").stdout == b"hello /x"
    time.sleep(0.3)
    assert not proxy.access_log.exists()


@pytest.mark.parametrize("fmt,pattern", [
    ("common", r'^127\.0\.0\.1 - - \[.+\] "GET http://127\.0\.0\.1:\d+/c\? HTTP/1\.1" 200 \d+ TCP_MISS:HIER_DIRECT$'),
    ("combined", r'^127\.0\.0\.1 - - \[.+\] "GET http://127\.0\.0\.1:\d+/c\? HTTP/1\.1" 200 \d+ "http://ref/" "relais-test" TCP_MISS:HIER_DIRECT$'),
])
def test_apache_formats_end_to_end(start_proxy, origin, fmt, pattern):
    proxy = start_proxy(options={"logformat": fmt})
    curl("-x", proxy.url, "-e", "http://ref/", "-A", "relais-test", f"{origin.url}/c?secret=1")
    assert re.match(pattern, proxy.log_line("/c?"))


def test_ipv6_hosts_are_written_in_brackets_as_squid_writes_them(proxy):
    """mitmproxy's URLs leave the brackets out (http://::1:1/), which no log reader parses right."""
    curl("-x", proxy.url, "http://[::1]:1/v6")  # port 1: denied by the policy, nothing goes out
    curl("-x", proxy.url, "https://[::1]:2/")
    assert " TCP_DENIED/403 " in proxy.log_line(" GET http://[::1]:1/v6 ")
    assert " TCP_DENIED/403 " in proxy.log_line(" CONNECT [::1]:2 ")


def test_query_kept_when_strip_query_terms_is_off(start_proxy, origin):
    proxy = start_proxy(options={"strip_query_terms": False})
    curl("-x", proxy.url, f"{origin.url}/q?a=1")
    assert f" GET {origin.url}/q?a=1 - " in proxy.log_line("/q?a=1")


def test_sighup_reopens_the_log_for_logrotate(proxy, origin):
    curl("-x", proxy.url, f"{origin.url}/before")
    proxy.log_line("/before")
    moved = proxy.access_log.with_name("access.log.1")
    proxy.access_log.rename(moved)          # what logrotate does...
    proxy.signal(signal.SIGHUP)              # ...then it signals
    deadline = time.monotonic() + 10
    while not proxy.access_log.exists() and time.monotonic() < deadline:
        curl("-x", proxy.url, f"{origin.url}/after")
        time.sleep(0.2)
    assert proxy.log_line("/after")
    assert "/before" in moved.read_text() and "/after" not in moved.read_text()
    assert proxy.proc.poll() is None


def test_rotate_command_keeps_numbered_logs(tmp_path):
    """accesslog.rotate renames like `squid -k rotate` and keeps logfile_rotate files."""
    addon = accesslog.AccessLog()
    path = tmp_path / "access.log"
    with taddons.context(addon) as tctx:
        tctx.configure(addon, access_log=str(path), logfile_rotate=2)
        for n in range(3):
            addon.write(rec(url=f"http://h/{n}"))
            addon.rotate()
            addon.writer.flush()
        addon.write(rec(url="http://h/now"))
        addon.done()
    assert "http://h/now" in path.read_text()
    assert "http://h/2" in (tmp_path / "access.log.0").read_text()
    assert "http://h/1" in (tmp_path / "access.log.1").read_text()
    assert not (tmp_path / "access.log.2").exists()


def test_rotate_with_logfile_rotate_0_only_reopens_as_squid_does(tmp_path):
    """logfile_rotate 0 is Squid's setting for an external rotator: nothing is renamed or lost."""
    addon = accesslog.AccessLog()
    path = tmp_path / "access.log"
    with taddons.context(addon) as tctx:
        tctx.configure(addon, access_log=str(path), logfile_rotate=0)
        addon.write(rec(url="http://h/kept"))
        addon.rotate()
        addon.writer.flush()
        moved = tmp_path / "access.log.1"  # what logrotate does before it asks for a reopen
        path.rename(moved)
        addon.rotate()
        addon.write(rec(url="http://h/after"))
        addon.done()
    assert "http://h/kept" in moved.read_text()
    assert "http://h/after" in path.read_text() and "http://h/kept" not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["access.log", "access.log.1"]


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_that_gives_up_an_upload_is_logged_aborted_not_as_a_failed_origin(proxy, origin, reset):
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(f"POST {origin.url}/upload HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
              f"Content-Length: 200000\r\n\r\n".encode() + b"z" * 5000)
    time.sleep(0.3)
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    line = proxy.wait_lines("/upload", 1)[0]
    assert line.split()[3] == "TCP_MISS_ABORTED/000", line
    assert origin.hits.get("/upload") is None


def test_concurrent_load_gives_whole_lines(proxy, origin):
    """200 requests from 20 concurrent clients: 200 complete, well-formed lines."""
    def fetch(i):
        with httpx.Client(proxy=proxy.url, timeout=20) as c:
            return c.get(f"{origin.url}/size/{1000 + i}").status_code
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert set(pool.map(fetch, range(200))) == {200}
    lines = proxy.log_lines(201)
    for line in lines:
        assert STRICT.match(line), line
    # the harness's readiness probe (a connection without a request) is logged too, as Squid does
    lines = [l for l in lines if " GET " in l]
    assert len(lines) == 200
    for line in lines:
        assert STRICT.match(line), line
    sizes = sorted(int(re.search(r"/size/(\d+) ", l).group(1)) for l in lines)
    assert sizes == list(range(1000, 1200))


def test_the_flow_ids_kept_against_double_lines_stay_bounded_on_a_long_keep_alive_connection(tmp_path):
    """Flows on one connection that never closes (a keep-alive client, a load balancer): the ids kept
    against logging a flow twice stay bounded, and an error after a response adds no line, even for
    the flows logged just before the oldest ids are let go."""
    from mitmproxy.test import tflow
    addon = accesslog.AccessLog()
    path = tmp_path / "access.log"
    client = tflow.tclient_conn()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, access_log=str(path))
        n = accesslog.LOGGED_MAX * 2 + 10
        flows = []
        for _ in range(n):
            f = tflow.tflow(client_conn=client, resp=True)
            addon.requestheaders(f)
            addon.response(f)
            flows.append(f)
            assert len(addon.logged) + len(addon.logged_before) <= 2 * accesslog.LOGGED_MAX
        for f in (flows[2 * accesslog.LOGGED_MAX - 1], flows[-1]):  # the last before a turnover, the last
            f.error = tflow.terr()
            addon.error(f)
        addon.writer.flush()
    assert len(path.read_text().splitlines()) == n


def test_lines_with_bytes_that_are_not_utf8_are_written_and_the_writer_goes_on(tmp_path):
    """A URL byte that is not UTF-8 (a lone surrogate in mitmproxy's str) is written as the byte the
    client sent; a surrogate that stands for no byte is escaped; later lines are still written."""
    path = tmp_path / "access.log"
    w = accesslog.Writer(path)
    try:
        w.pending = ["GET /caf\udce9", "GET /odd\ud800"]
        w.hand_over()  # one batch
        w.put("GET /after")
        w.flush()
        assert w.thread.is_alive()
    finally:
        w.close()
    assert path.read_bytes() == b"GET /caf\xe9\nGET /odd\\ud800\nGET /after\n"


def test_a_log_that_cannot_be_reopened_loses_lines_until_it_can_then_writes_again(tmp_path, caplog):
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "access.log"
    w = accesslog.Writer(path)
    try:
        w.put("GET /before")
        w.flush()
        (folder / "access.log").unlink()
        folder.rmdir()
        w.call(w.reopen)  # fails: the folder is gone
        for n in range(3):
            w.put(f"GET /lost{n}")
            w.flush()
        folder.mkdir()
        w.put("GET /back")  # the batch that finds the folder back is written
        w.flush()
        w.put("GET /after")
        w.flush()
        assert w.thread.is_alive()
    finally:
        w.close()
    assert path.read_text().splitlines() == ["GET /back", "GET /after"]
    assert caplog.text.count("cannot write") == 1 and "writing again; 3 lines were lost" in caplog.text


def test_a_stuck_writer_holds_a_bounded_number_of_lines_and_says_how_many_it_dropped(tmp_path, caplog,
                                                                                     monkeypatch):
    """A hung disk stops the writer thread: lines past QUEUED_MAX are dropped and counted, not queued
    without end; once it writes again it says how many were dropped."""
    monkeypatch.setattr(accesslog, "QUEUED_MAX", 100)
    path = tmp_path / "access.log"
    w = accesslog.Writer(path)
    gate = threading.Event()
    try:
        w.call(lambda: gate.wait(10))  # the thread hangs as on a hung disk
        for n in range(250):
            w.put(f"GET /{n}")  # no event loop: each line is its own batch
        assert w.queued == 100 and w.dropped == 150
        assert "new lines are dropped" in caplog.text
        gate.set()
        w.flush()
        w.put("GET /after")
        w.flush()
    finally:
        gate.set()
        w.close()
    assert path.read_text().splitlines() == [f"GET /{n}" for n in range(100)] + ["GET /after"]
    assert "writing again; 150 lines were dropped" in caplog.text and w.queued == 0


def test_a_slow_writer_stops_dropping_once_half_its_queue_is_written(tmp_path, caplog, monkeypatch):
    """Dropping, once begun, goes on until the queue is half written (a slow disk near the limit does
    not log an error and a warning at every batch); a failed write does not count as writing again."""
    monkeypatch.setattr(accesslog, "QUEUED_MAX", 100)
    w = accesslog.Writer(tmp_path / "access.log")
    gate = threading.Event()
    try:
        w.call(lambda: gate.wait(10))  # the thread is busy: the counts below move only as we say
        for n in range(101):
            w.put(f"GET /{n}")
        assert (w.queued, w.dropped, w.dropping) == (100, 1, True)
        w._written(10, True)  # 90 left: still dropping
        w.put("GET /x")
        assert (w.queued, w.dropped) == (90, 2)
        w._written(40, False)  # 50 left, but that write failed
        assert w.dropping and "writing again" not in caplog.text
        w._written(1, True)  # 49 left, written: new lines are taken again
        assert not w.dropping and "writing again; 2 lines were dropped" in caplog.text
        assert caplog.text.count("new lines are dropped") == 1
    finally:
        gate.set()
        w.close()


def test_a_client_gone_before_the_log_hears_of_its_flow_is_noted_nowhere(tmp_path):
    """A client can leave while an earlier addon's hook is awaited (a DNS lookup, a collapsed miss);
    its disconnect was handled before the log's hook runs, so nothing may be kept for it, and its
    CONNECT is logged at once (no tunnel follows)."""
    from mitmproxy.test import tflow, tutils
    addon = accesslog.AccessLog()
    path = tmp_path / "access.log"
    with taddons.context(addon) as tctx:
        tctx.configure(addon, access_log=str(path))
        get = tflow.tflow()
        connect = tflow.tflow(req=tutils.treq(method=b"CONNECT", host="example.com", port=443, path=b""))
        for f in (get, connect):
            f.client_conn.timestamp_end = time.time()
        addon.requestheaders(get)
        addon.http_connect(connect)
        assert addon.seen == set() and addon.connects == {}
        addon.writer.flush()
    line, = path.read_text().splitlines()
    assert " NONE_NONE/000 0 CONNECT example.com:443 " in line


def test_dropping_ends_when_the_queue_empties_even_if_its_last_writes_failed(tmp_path, caplog, monkeypatch):
    """A hung disk that comes back full: the queued lines fail, then the disk is freed. New lines are
    taken and written again, and the count of the dropped ones is given."""
    monkeypatch.setattr(accesslog, "QUEUED_MAX", 100)
    w = accesslog.Writer(tmp_path / "access.log")
    gate = threading.Event()

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    def cannot_open():
        raise OSError(28, "No space left on device")
    try:
        w.call(lambda: gate.wait(10))
        for n in range(101):
            w.put(f"GET /{n}")
        assert w.dropping
        w.file, w._open = Full(), cannot_open  # the thread is held: it sees them when it goes on
        gate.set()
        w.flush()
        assert w.queued == 0 and w.dropping  # every queued line failed
        del w._open
        w.call(lambda: setattr(w, "file", w._open()))  # the disk has room again
        w.put("GET /after")
        w.flush()
    finally:
        gate.set()
        w.close()
    assert (tmp_path / "access.log").read_text().splitlines() == ["GET /after"]
    assert "writing again; 1 lines were dropped" in caplog.text and not w.dropping


def test_an_origin_response_mitmproxy_refuses_is_logged_as_the_502_the_client_got(proxy, origin):
    """Transfer-Encoding with Content-Length (RFC 9112 6.3, a smuggling risk): mitmproxy refuses the response
    after reading its head and sends its own 502 page. The log says 502, with that page's size."""
    origin.route("/smuggle", lambda s: (200, {"Transfer-Encoding": "chunked", "Content-Length": "5"},
                                        lambda: iter([b"5\r\nhello\r\n0\r\n\r\n"])))
    r = curl("-i", "-x", proxy.url, f"{origin.url}/smuggle")
    assert r.stdout.startswith(b"HTTP/1.1 502"), r.stdout[:200]
    code, size = proxy.wait_lines("/smuggle", 1)[0].split()[3:5]
    assert code == "TCP_MISS/502" and int(size) == len(r.stdout)


@pytest.mark.parametrize("head,port,logged", [
    ("POST {name} HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", "origin", "POST {url}"),
    ("POST {name} HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "origin", "POST {url}"),
    ("POST {name} HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd", "origin", "POST {url}"),
    ("POST {name} HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", "1", "POST {url}"),
    ("GET {name} HTTP/1.1\r\nBad Header\r\n\r\n", "origin", "- error:invalid-request")],
    ids=["length-and-chunked", "gzip-coded-request", "two-lengths", "denied-too", "header-line"])
def test_a_request_mitmproxy_refuses_is_logged_as_the_400_the_client_got(proxy, origin, head, port, logged):
    """Framing that smuggling uses, or a header line that is no header: mitmproxy answers 400 itself, after
    the hooks saw the request (an access rule may have denied it). Logged NONE_NONE/400 with the size sent,
    not as an origin's failure (TCP_MISS/502), an aborted transfer, or a denial the client never got."""
    name = f"refused-{time.monotonic_ns()}"
    host = f"127.0.0.1:{origin.port if port == 'origin' else port}"
    url = f"http://{host}/{name}"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(head.format(name=url).replace("HTTP/1.1\r\n", f"HTTP/1.1\r\nHost: {host}\r\n", 1).encode())
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    line = proxy.wait_lines(name if "{url}" in logged else "error:invalid-request", 1)[-1]
    assert line.split()[3:5] == ["NONE_NONE/400", str(len(got))]
    assert f" {logged.format(url=url)} - HIER_NONE/- text/html" in line
    assert origin.hits.get(f"/{name}", 0) == 0


@pytest.mark.parametrize("port", ["2121", "9"], ids=["allowed", "denied-too"])
def test_a_url_scheme_mitmproxy_does_not_relay_is_logged_as_the_400_the_client_got(proxy, port):
    """An ftp:// URL: mitmproxy answers 400 itself after the hooks saw the request, whether the access
    rules allowed it (port 2121 is a Safe_port) or denied it (port 9 is not): logged NONE_NONE/400 with
    the size sent, not as a denial the client never got or an aborted transfer."""
    url = f"ftp://127.0.0.1:{port}/file-{time.monotonic_ns()}.txt"
    r = curl("-i", "-x", proxy.url, url)
    assert r.stdout.startswith(b"HTTP/1.1 400") and b"Invalid request scheme: ftp" in r.stdout, r.stdout[:300]
    line = proxy.wait_lines(url, 1)[-1]
    assert line.split()[3:5] == ["NONE_NONE/400", str(len(r.stdout))]
    assert f" GET {url} - HIER_NONE/- text/html" in line


def test_a_connect_to_a_reverse_listener_is_logged_as_the_400_the_client_got(start_proxy, origin):
    """A reverse proxy takes no CONNECT: mitmproxy answers 400 itself after the hooks saw it (the access
    rules denied port 1): logged NONE_NONE/400, not as that denial, with 0 bytes as Squid logs any refused
    CONNECT."""
    p = start_proxy(modes=(f"reverse:{origin.url}",))
    r = curl("-i", "-p", "-x", p.url, "http://127.0.0.1:1/x")
    assert r.stdout.startswith(b"HTTP/1.1 400"), r.stdout[:300]
    line = p.wait_lines("CONNECT 127.0.0.1:1 ", 1)[-1]
    assert line.split()[3:5] == ["NONE_NONE/400", "0"]


def test_an_http2_stream_the_client_cancels_is_logged_aborted_not_as_a_failed_origin(start_proxy, tls_origin):
    """A browser cancels HTTP/2 streams and keeps its connection: that is no 502 from the origin."""
    import ssl
    import h2.connection
    import h2.errors
    import h2.events
    tls_origin.route("/slow-h2", lambda s: (time.sleep(1.5), (200, {"Content-Type": "text/plain"}, b"late"))[1])
    p = start_proxy(options={"connection_strategy": "lazy"})
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    host = f"127.0.0.1:{tls_origin.port}"
    s.sendall(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(100)
    ctx = ssl.create_default_context(cafile=p.ca)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    try:
        assert t.selected_alpn_protocol() == "h2"
        c = h2.connection.H2Connection()
        c.initiate_connection()
        c.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", host), (":path", "/slow-h2")],
                       end_stream=True)
        t.sendall(c.data_to_send())
        time.sleep(0.3)
        c.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        t.sendall(c.data_to_send())
        line = p.wait_lines("/slow-h2", 1, timeout=15)[0]
    finally:
        t.close()
    assert line.split()[3] == "TCP_MISS_ABORTED/000", line


def test_a_websocket_session_is_logged_once_when_it_ends_with_its_duration_and_bytes(proxy):
    """Not at the 101, 6 ms in: at the end of the session, its whole duration and what the client received."""
    import base64
    import hashlib
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo():
        for _ in range(3):  # the errors addon may probe the origin with a connection of its own first
            conn, _ = server.accept()
            conn.settimeout(10)
            head = conn.recv(4096)
            if head:
                break
            conn.close()
        with conn:
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key"))
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            conn.recv(4096)  # the client's masked text frame
            conn.sendall(bytes([0x81, 100]) + b"e" * 100)  # 100 bytes of text to the client
            time.sleep(1.2)
            conn.sendall(bytes([0x88, 0]))  # close
            try:
                conn.recv(4096)
            except OSError:
                pass
    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        c.sendall(f"GET http://127.0.0.1:{port}/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        c.sendall(bytes([0x81, 0x82]) + b"abcd" + bytes(x ^ m for x, m in zip(b"hi", b"ab")))
        time.sleep(0.3)
        assert not any("/chat" in l for l in proxy.log_lines(0, timeout=0.5))  # not at the 101
        t.join(10)
        c.close()
        line = proxy.wait_lines("/chat", 1)[0]
    finally:
        server.close()
    fields = line.split()
    assert fields[3] == "TCP_MISS/101" and int(fields[1]) >= 1200, line
    assert 100 <= int(fields[4]) - len(head) <= 110, (fields[4], len(head))
    assert len([l for l in proxy.log_lines(1) if "/chat" in l]) == 1


@pytest.mark.parametrize("method", [b"G\x1b[31mET", b"G\x00ET", b"G\x7fET"], ids=["esc", "nul", "del"])
def test_a_method_with_control_bytes_is_logged_encoded(proxy, origin, method):
    """mitmproxy forwards such a method; the log line gets it %-encoded, not the raw bytes."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(method + f" {origin.url}/ctl HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                           "Connection: close\r\n\r\n".encode())
        while s.recv(4096):
            pass
    line = proxy.wait_lines("/ctl", 1)[0]
    encoded = "".join(c if " " < c < "\x7f" else f"%{ord(c):02X}" for c in method.decode().upper())
    assert line.split()[5] == encoded, line  # mitmproxy gives methods in upper case
    assert STRICT.match(line), line
    assert not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]", proxy.access_log.read_bytes())


def test_a_user_agent_cannot_forge_combined_fields(start_proxy, origin):
    proxy = start_proxy(options={"logformat": "combined"})
    curl("-x", proxy.url, "-A", 'evil" 200 999 "-" "fake\x1b[2J', f"{origin.url}/ua")
    line = proxy.log_line("/ua")
    assert line.endswith(r' "-" "evil\" 200 999 \"-\" \"fake\x1b[2J" TCP_MISS:HIER_DIRECT'), line
    assert not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]", proxy.access_log.read_bytes())


def test_the_combined_format_logs_the_referer_and_user_agent_the_client_sent_not_the_anonymized_ones(
        start_proxy, origin):
    """As Squid's %{Referer}>h and %{User-Agent}>h: the paranoid level sends a common User-Agent and no
    cross-site Referer upstream, and the log still says what the client sent."""
    proxy = start_proxy(options={"logformat": "combined", "anonymize": "paranoid"})
    curl("-x", proxy.url, "-A", "EvilCorpAgent/2", "-e", "http://other.test/page?x", f"{origin.url}/who-sent")
    assert origin.requests[-1].headers["user-agent"] != "EvilCorpAgent/2"  # anonymized upstream
    line = proxy.log_line("/who-sent")
    assert ' "http://other.test/page?x" "EvilCorpAgent/2" ' in line, line


@pytest.fixture
def tiny_disk(small_disk):
    """64 KB, filled to the last byte in a moment."""
    return small_disk("64k")


@pytest.mark.parametrize("append_only", [False, True], ids=["truncatable", "append-only"])
def test_a_write_a_full_disk_cuts_short_leaves_no_part_of_a_line_glued_to_the_next(tiny_disk, caplog,
                                                                                  append_only):
    """The disk fills in the middle of a batch: what reached the file is cut off again. A file that
    cannot be truncated (append-only, chattr +a) gets its part of a line ended before the next write;
    the lines lost are counted either way."""
    path = tiny_disk / "access.log"
    path.touch()
    if append_only:
        assert shutil.which("chattr"), "chattr (e2fsprogs) makes the file append-only"
        subprocess.run(["chattr", "+a", str(path)], check=True)
    w = accesslog.Writer(path)
    try:
        w.put("GET /before")
        w.flush()
        filler = fill_disk(tiny_disk)
        batch = [f"GET /full-{n:03d} " + "x" * 40 for n in range(400)]  # 22 KB: more than the room left
        w.pending = batch
        w.hand_over()  # one batch
        w.flush()
        filler.unlink()  # room again
        w.put("GET /after")
        w.flush()
        assert w.thread.is_alive()
    finally:
        w.close()
        if append_only:
            subprocess.run(["chattr", "-a", str(path)], check=False)
    lines = path.read_text().splitlines()
    assert lines[0] == "GET /before" and lines[-1] == "GET /after"
    middle = lines[1:-1]
    if append_only:
        *kept, part = middle
        assert kept == batch[:len(kept)] and 0 < len(part) < len(batch[len(kept)])
        assert batch[len(kept)].startswith(part)
        lost = len(batch) - len(kept)
    else:
        assert middle == []
        lost = len(batch)
    assert f"writing again; {lost} lines were lost" in caplog.text


def test_a_reopen_that_fails_says_so_and_not_that_it_reopened(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "access.log"
    w = accesslog.Writer(path)
    try:
        w.call(w.reopen)
        w.flush()
        assert f"access log reopened: {path}" in caplog.text
        caplog.clear()
        path.unlink()
        path.mkdir()  # in the way of the log
        w.call(w.reopen)
        w.flush()
        assert "Is a directory" in caplog.text and "reopened" not in caplog.text
        path.rmdir()  # back before the next batch: it is written, not lost
        w.put("after the failed reopen")
        w.flush()
        assert path.read_text() == "after the failed reopen\n" and "lost" not in caplog.text
    finally:
        w.close()


def test_a_content_type_with_raw_bytes_is_logged_with_those_bytes_encoded():
    headers = http.Headers([(b"Content-Type", b"text/\x9bx")])
    assert accesslog.mime_of(headers) == "text/\udc9bx"  # as mitmproxy keeps a byte that is not UTF-8
    assert accesslog.format_squid(rec(mime=accesslog.mime_of(headers))).endswith(" text/%9Bx")
