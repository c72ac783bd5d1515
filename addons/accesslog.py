"""Access log in Squid's native access.log format (and Apache common/combined).

One line per transaction, written by the log's own writer thread (not through
the console logger, and not on the event loop, which never waits for the
disk); it is the file's only writer and writes whole lines, so lines are never
split or interleaved.

    mitmdump -s addons/accesslog.py --set access_log=var/log/access.log

Commands: accesslog.rotate (like `squid -k rotate`). SIGHUP reopens the file
so that logrotate's "move then signal" works.
"""
# No `from __future__ import annotations` here: mitmproxy loads scripts without
# registering them in sys.modules, where dataclasses then look string annotations up.
import asyncio
import dataclasses
import functools
import ipaddress
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from itertools import chain
from pathlib import Path

from mitmproxy import command, ctx, exceptions, http, tcp
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import layers

try:
    from addons import meta, streams
except ImportError:  # loaded by path (mitmdump -s addons/accesslog.py) without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import meta, streams

FORMATS = ("squid", "common", "combined")


@dataclasses.dataclass
class Record:
    """One access.log transaction, independent of mitmproxy's flow types."""
    end: float                  # epoch seconds when the transaction ended
    elapsed_ms: int
    client: str
    code: str                   # Squid result code, e.g. TCP_MISS
    status: int                 # HTTP status sent to the client, 0 if none
    size: int                   # bytes sent to the client, headers included
    method: str
    url: str
    user: str = "-"
    hier: str = "HIER_NONE"
    peer: str = "-"
    mime: str = "-"
    version: str = "1.1"
    referer: str = "-"
    agent: str = "-"


# What a client or an origin can put in a field that would break the line: control characters (a
# terminal's escape sequences, NUL, line breaks; Unicode's, and C1 ones also as the raw bytes mitmproxy
# keeps as lone surrogates) and, where fields are separated by spaces, a space.
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udc9f"
_SQUID_UNSAFE = re.compile(f"[ {_CONTROLS}]")
_APACHE_UNSAFE = re.compile(f'[{_CONTROLS}"\\\\]')         # in a quoted field: " and \ too, as Apache
_APACHE_WORD_UNSAFE = re.compile(f'[ {_CONTROLS}"\\\\]')   # user, method, URL: spaces too
_APACHE_SHORT = {"\b": "\\b", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", '"': '\\"', "\\": "\\\\"}


def _percent(m: re.Match) -> str:
    """%XX for each byte, as Squid's rfc1738 escaping writes the fields of its native format."""
    return "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogateescape"))


def _backslash(m: re.Match) -> str:
    r"""\" \\ \n ... and \xhh for each other byte, as Apache's ap_escape_logitem writes them."""
    c = m.group()
    return _APACHE_SHORT.get(c) or "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape"))


def format_squid(r: Record) -> str:
    fields = r.method, r.url, r.user, r.peer, r.mime  # what the client or the origin chose
    if _SQUID_UNSAFE.search("".join(fields)):  # one test for a clean line, the usual one
        fields = [_SQUID_UNSAFE.sub(_percent, f) for f in fields]
    method, url, user, peer, mime = fields
    ms = int(r.end * 1000)
    return (f"{ms // 1000}.{ms % 1000:03d} {r.elapsed_ms:6d} {r.client} {r.code}/{r.status:03d} "
            f"{r.size} {method} {url} {user} {r.hier}/{peer} {mime}")


def format_common(r: Record, combined: bool = False) -> str:
    when = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(r.end))
    user, method, url = (_APACHE_WORD_UNSAFE.sub(_backslash, f) for f in (r.user, r.method, r.url))
    line = (f'{r.client} - {user} [{when}] "{method} {url} HTTP/{r.version}" '
            f"{r.status} {r.size}")
    if combined:
        line += f' "{_APACHE_UNSAFE.sub(_backslash, r.referer)}" "{_APACHE_UNSAFE.sub(_backslash, r.agent)}"'
    return f"{line} {r.code}:{r.hier}"


FORMATTERS = {
    "squid": format_squid,
    "common": format_common,
    "combined": lambda r: format_common(r, combined=True),
}


def strip_query(url: str) -> str:
    """Squid's strip_query_terms: keep the '?' but drop what follows."""
    i = url.find("?")
    return url if i < 0 else url[: i + 1]


def mime_of(headers) -> str:
    """Content type without parameters, as Squid logs it."""
    if headers is None:
        value = ""
    elif isinstance(getattr(headers, "fields", None), tuple):  # mitmproxy Headers: the first field, no join
        value = next((v for k, v in headers.fields if k.lower() == b"content-type"), b"").decode("utf-8", "surrogateescape")
    else:
        value = headers.get("content-type", "")
    value = value.split(";", 1)[0].strip()
    return value.split()[0] if value else "-"


def head_size(response: http.Response) -> int:
    """Bytes of the response head as HTTP/1 sends it: status line, fields, blank line."""
    d = response.data
    fields = d.headers.fields  # "name: value\r\n" each; summed in C, not per field in Python
    return (len(d.http_version) + len(str(d.status_code)) + len(d.reason) + 4
            + sum(map(len, chain.from_iterable(fields))) + 4 * len(fields) + 2)


def body_size(flow: http.HTTPFlow, method: str) -> int:
    resp = flow.response
    if resp is None or method == "HEAD":
        return 0
    sent = flow.metadata.get(meta.SENT_BYTES)
    if sent is not None:
        return sent
    if resp.raw_content is not None:
        return len(resp.raw_content)
    try:
        return int(resp.headers.get("content-length", "0"))
    except ValueError:
        return 0


def http_record(flow: http.HTTPFlow, strip: bool = True, aborted: bool = False, combined: bool = False,
                sent: http.Response | None = None, client_fields: tuple[str, str] | None = None) -> Record:
    """The log record of an HTTP flow, from its state and the metadata contract; `sent`: the response the
    client got when it is not flow.response (mitmproxy's own error page); `client_fields`: the Referer
    and User-Agent the client sent (anonymization may have changed them since)."""
    req, resp, md = flow.request, sent or flow.response, flow.metadata
    method = req.method
    is_connect = method == "CONNECT"
    if is_connect:
        url = meta.hostport(req.host, req.port)
    else:
        url = meta.pretty_url(req) if meta.mode_name(flow) in ("transparent", "reverse") else meta.request_url(req)
        if strip:
            url = strip_query(url)
        url = url[:meta.MAX_URL]  # (a URL refused as too long: one bounded line, as Squid's)
    code = md.get(meta.CODE) or ("TCP_TUNNEL" if is_connect else "TCP_MISS")
    if aborted and not code.endswith("_ABORTED"):
        code += "_ABORTED"
    peer = meta.peer(flow)
    hier = md.get(meta.HIER) or (meta.forwarded(flow) if peer and not md.get(meta.LOCAL) else "HIER_NONE")
    status = resp.status_code if resp else 0
    if not resp or (is_connect and code == "NONE_NONE"):
        size = 0  # Squid counts nothing for a refused or bumped CONNECT
    elif aborted and md.get(meta.SENT_BYTES) is None:
        size = 0  # buffered, and the client left before any of it was sent
    else:
        size = head_size(resp) + (len(resp.raw_content or b"") if sent else body_size(flow, method))
    end = time.time()
    start = req.timestamp_start or end
    return Record(
        end, max(0, int((end - start) * 1000)), meta.client_ip(flow), code, status, size, method, url,
        user=meta.user(flow) or "-",
        hier=hier,
        peer=peer if hier != "HIER_NONE" and peer else "-",
        mime=mime_of(resp.headers) if resp and not is_connect else "-",
        version=req.http_version.replace("HTTP/", "") or "1.1",
        referer=(client_fields or _referer_agent(req))[0] if combined else "-",
        agent=(client_fields or _referer_agent(req))[1] if combined else "-",
    )


def _referer_agent(req: http.Request) -> tuple[str, str]:
    return req.headers.get("referer", "-"), req.headers.get("user-agent", "-")


def rotate_files(path: Path, keep: int, writer: "Writer") -> None:
    """access.log -> access.log.0 -> access.log.1 ... keeping `keep` old files, then reopen.
    keep 0 only reopens, as Squid's logfile_rotate 0 does for an external rotator (logrotate)."""
    for i in range(keep - 1, 0, -1):
        old = path.with_name(f"{path.name}.{i - 1}")
        if old.exists():
            old.replace(path.with_name(f"{path.name}.{i}"))
    if keep > 0 and path.exists():
        path.replace(path.with_name(f"{path.name}.0"))
    writer.reopen()


def _who_and_when(flow, start: float | None) -> dict:
    end = time.time()
    return dict(end=end, elapsed_ms=max(0, int((end - (start or end)) * 1000)),
                client=meta.client_ip(flow), user=meta.user(flow) or "-")


def tcp_record(flow: tcp.TCPFlow, code: str | None = None, status: int = 200) -> Record:
    """A raw TCP stream (CONNECT tunnel, socks5, transparent) as Squid logs tunnels."""
    host, port = flow.server_conn.address or ("-", 0)
    sni = flow.client_conn.sni
    peer = meta.peer(flow)
    size = flow.metadata.get(meta.SENT_BYTES)
    if size is None:
        size = sum(len(m.content) for m in flow.messages if not m.from_client)
    code = flow.metadata.get(meta.CODE) or code or "TCP_TUNNEL"
    if code == "TCP_DENIED":
        # Squid never contacts the server of a denied tunnel (mitmproxy may already have).
        status, size, peer = 403, 0, None
    return Record(
        **_who_and_when(flow, flow.client_conn.timestamp_start),
        code=code,
        status=status,
        size=size,
        method="CONNECT",
        url=meta.hostport(sni or host, port),
        hier=meta.forwarded(flow) if peer else "HIER_NONE",
        peer=peer or "-",
    )


LOGGED_MAX = 10000  # flow ids remembered against logging a flow twice (an error after its response)
BATCH_DELAY = 0.05  # seconds a line may wait for others to be written with it
QUEUED_MAX = 100_000  # lines waiting for the writer thread (about 20 MB); more are dropped and counted


class Writer:
    """Appends lines to a file from its own thread, so the event loop never waits for the disk.

    It is the only writer of the file and writes whole lines, so lines are
    never split or interleaved; what a failed write (a full disk) left of a
    batch is cut off before the next. Lines gather on the event loop for BATCH_DELAY
    and go to the thread as one batch, written with one write() call: a
    hand-over per line would wake the thread, and make it take the GIL from
    the event loop, once per request.
    """

    def __init__(self, path: Path):
        self.path = path
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: list[str] = []  # lines not yet handed to the thread (event loop side)
        self.file = self._open()
        self.lost = 0  # lines dropped since the last successful write
        self.torn = False  # the file ends with part of a line (a failed write that could not be cut off)
        self.lock = threading.Lock()
        self.queued = 0   # lines handed to the thread and not yet written
        self.dropped = 0  # lines not handed over because QUEUED_MAX were waiting
        self.dropping = False
        self.thread = threading.Thread(target=self._run, name="relais-accesslog", daemon=True)
        self.thread.start()

    def put(self, line: str) -> None:
        self.pending.append(line)
        if len(self.pending) == 1:
            try:
                asyncio.get_running_loop().call_later(BATCH_DELAY, self.hand_over)
            except RuntimeError:  # no event loop (in-process use): no batching
                self.hand_over()

    def hand_over(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            with self.lock:
                # the thread is stuck (a hung disk): memory stays bounded; dropping goes on until half
                # the queue is written, so that a slow disk does not flip it on and off at every batch,
                # or until nothing waits any more (the queue's last writes all failed)
                if self.dropping and not self.queued:
                    self.dropping = False
                if self.dropping or self.queued + len(lines) > QUEUED_MAX:
                    if not self.dropping:
                        self.dropping = True
                        logging.getLogger(__name__).error(
                            "access log %s: %d lines wait to be written (is the disk hung?); new lines are "
                            "dropped until half of them are", self.path, self.queued)
                    self.dropped += len(lines)
                    return
                self.queued += len(lines)
            self.queue.put(lines)

    def call(self, fn) -> None:
        """Run fn() in the writer thread, after the lines put before it."""
        self.hand_over()
        self.queue.put(fn)

    def flush(self, timeout: float = 10.0) -> None:
        done = threading.Event()
        self.call(done.set)
        done.wait(timeout)

    def reopen(self) -> None:
        if self.torn:  # the file being left ends with part of a line: end it there, not in the next file
            try:
                self.file.write(b"\n")
                self.torn = False
            except (OSError, ValueError):
                pass
        self.file.close()
        self.file = self._open()  # an error is logged by _run; _write opens it again at the next batch
        logging.getLogger(__name__).info("access log reopened: %s", self.path)

    def close(self) -> None:
        self.hand_over()
        self.queue.put(None)
        self.thread.join(10)

    def _open(self):
        # unbuffered: what a failed write() leaves is in the file, where it can be cut off, not in a buffer
        return open(self.path, "ab", buffering=0)

    def _write(self, lines: list[str]) -> bool:
        """Write a batch; on failure (a full disk) drop it, say so once, and start clean."""
        try:
            # mitmproxy keeps bytes that are not UTF-8 (in a URL, a header) as lone surrogates:
            # they are written back as the bytes the client sent, as Squid logs them
            data = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that stands for no byte: that line escapes it
            data = "".join(_writable(line) + "\n" for line in lines).encode("utf-8", "surrogateescape")
        if self.file.closed:  # a reopen failed: the file may be back by now
            try:
                self.file = self._open()
            except OSError:
                pass
        start = b"\n" if self.torn else b""  # ends the part of a line an earlier failure left
        data = start + data
        done = 0
        try:
            view = memoryview(data)
            while done < len(data):  # a filling disk takes part of the data, then fails
                done += self.file.write(view[done:])
        except (OSError, ValueError) as e:  # ValueError: the file is closed (a reopen failed)
            kept = 0
            if done and not self._cut(done):  # the next write ends the part of a line left
                kept = data.count(b"\n", len(start), done)  # the batch's whole lines that stay
                self.torn = data[done - 1] != ord("\n")
            if not self.lost:
                logging.getLogger(__name__).error("access log %s: cannot write (%s); lines are lost "
                                                  "until it can", self.path, e)
            self.lost += len(lines) - kept
            try:  # a closed file, or one that went away, is opened again
                self.file = self._open()
            except OSError:
                pass
            return False
        self.torn = False
        if self.lost:
            logging.getLogger(__name__).warning("access log %s: writing again; %d lines were lost",
                                                self.path, self.lost)
            self.lost = 0
        return True

    def _cut(self, done: int) -> bool:
        """Remove the last `done` bytes written (those of a failed write), so that the file ends with a
        whole line; False if it cannot be truncated (a pipe, an append-only file)."""
        try:
            fd = self.file.fileno()
            os.ftruncate(fd, os.fstat(fd).st_size - done)
            return True
        except OSError:
            return False

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                self.file.close()
                return
            try:  # the thread outlives any one batch or call: nothing else would write the log
                if isinstance(item, list):
                    written = False
                    try:
                        written = self._write(item)
                    finally:
                        self._written(len(item), written)
                else:
                    item()
            except Exception as e:
                logging.getLogger(__name__).error("access log %s: %s", self.path, e)

    def _written(self, n: int, ok: bool) -> None:
        dropped = 0
        with self.lock:
            self.queued -= n
            if ok and self.dropping and self.queued <= QUEUED_MAX // 2:
                self.dropping = False
            if ok and not self.dropping:
                dropped, self.dropped = self.dropped, 0
        if dropped:
            logging.getLogger(__name__).warning("access log %s: writing again; %d lines were dropped",
                                                self.path, dropped)


def _writable(line: str) -> str:
    try:
        line.encode("utf-8", "surrogateescape")
        return line
    except UnicodeEncodeError:
        return line.encode("utf-8", "backslashreplace").decode("utf-8")


# mitmproxy's words (11 and 12) for a request it answers 400 for its framing (validate_inbound_headers)
REFUSED_FRAMING = " from client, refusing to prevent request smuggling"
# ... or for its URL's scheme (ftp://...), or for a CONNECT to a listener that takes none (reverse,
# transparent): validate_request, also after the hooks saw the request
REFUSED_REQUEST = (REFUSED_FRAMING, "Invalid request scheme: ", " received an HTTP CONNECT request even though ")
# and for a request head it cannot parse (net/http/http1/read.py), which makes no flow
UNPARSABLE = ("Bad HTTP request", "Invalid HTTP request", "Invalid header", "Unknown HTTP version")


class BadRequestWatch(logging.Handler):
    """Notes the clients whose request mitmproxy rejected as unparsable.

    mitmproxy answers those with a 400 and closes, firing no flow hook; it
    only logs "Bad HTTP request line: b'...'" with the client's address.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bad: dict[tuple, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        client = getattr(record, "client", None)
        msg = record.getMessage()
        if client and any(words in msg for words in UNPARSABLE):
            self.bad[tuple(client)] = msg
            if len(self.bad) > 1000:
                self.bad.pop(next(iter(self.bad)))


def bad_request_record(client, message: str) -> Record:
    """Squid's NONE_NONE/400 error:invalid-request line for an unparsable request."""
    m = re.search(r"Bad HTTP request line: b['\"](.*?)['\"]\s*$", message)  # (other messages quote a header)
    method = ((m.group(1).split() if m else []) or ["-"])[0][:40]
    try:
        from mitmproxy.proxy.layers.http._http1 import make_error_response
        size = len(make_error_response(400, message.split(": ", 1)[-1]))
    except Exception:
        size = 0
    return Record(end=time.time(), elapsed_ms=_elapsed(client), client=_ip(client.peername),
                  code="NONE_NONE", status=400, size=size, method=method,
                  url="error:invalid-request", mime="text/html")


class AccessLog:
    # In the suite (addons/suite.py) note_client runs before any addon's hook for these events: a
    # client that leaves while a later hook is awaited (a DNS lookup) is then known to have sent a
    # request, and its connection is not also logged as closed before one.
    first_hooks = {"requestheaders": "note_client", "http_connect": "note_client", "tcp_start": "note_client"}

    def __init__(self) -> None:
        self.bad_requests = BadRequestWatch()
        self.format = format_squid
        self.combined = False     # logformat combined: Referer and User-Agent are logged
        self.client_fields: dict[str, tuple[str, str]] = {}  # flow id -> them, as the client sent them
        self.strip_query = True   # strip_query_terms
        self.late_streams = False  # stream_large_bodies is set: a body of unknown length may be streamed
        self.path: Path | None = None
        self.writer: Writer | None = None
        self.logged: set[str] = set()          # flow ids already written (error after response...)
        self.logged_before: set[str] = set()   # the ones before those
        self.connects: dict[object, http.HTTPFlow] = {}  # client conn -> its pending CONNECT
        self.tunnelled: set[object] = set()    # client conns whose CONNECT was logged by a TCP flow
        self.intercepted: set[object] = set()  # client conns with decrypted requests inside their CONNECT
        self.seen: set[str] = set()            # ids of the client conns that carried at least one flow

    def load(self, loader):
        loader.add_option(
            "access_log", str, "var/log/access.log",
            "Squid access_log: file the access log is written to (its folder is created when the option is "
            "set, not again if it goes: lines are then lost, and counted, until it is back); 'none' disables it.",
        )
        loader.add_option(
            "logformat", str, "squid",
            f"Squid logformat of the access log: one of {', '.join(FORMATS)} "
            "(squid is Squid's native format; common/combined are Apache's).",
        )
        loader.add_option(
            "strip_query_terms", bool, True,
            "Squid strip_query_terms: log URLs without their query terms (keeping the '?').",
        )
        loader.add_option(
            "logfile_rotate", int, 10,
            "Squid logfile_rotate: how many old access logs accesslog.rotate keeps (access.log.0 ...); "
            "0 renames nothing and only reopens the file, as Squid does for an external rotator (logrotate).",
        )

    def configure(self, updated):
        if "logformat" in updated:
            if ctx.options.logformat not in FORMATTERS:
                raise exceptions.OptionsError(
                    f"logformat: unknown format {ctx.options.logformat!r}; use one of {', '.join(FORMATS)}")
            self.format = FORMATTERS[ctx.options.logformat]
            self.combined = ctx.options.logformat == "combined"
        if "stream_large_bodies" in updated:
            self.late_streams = bool(getattr(ctx.options, "stream_large_bodies", None))  # see addons/streams.py
        if "strip_query_terms" in updated:
            self.strip_query = ctx.options.strip_query_terms
        if "logfile_rotate" in updated and ctx.options.logfile_rotate < 0:
            raise exceptions.OptionsError(f"logfile_rotate: must be 0 or more, not {ctx.options.logfile_rotate}")
        if "access_log" in updated:
            value = ctx.options.access_log.strip()
            if not value:
                raise exceptions.OptionsError("access_log: empty path; use 'none' to disable the access log")
            path = None if value == "none" else Path(value)
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "a"):
                        pass
                except OSError as e:
                    raise exceptions.OptionsError(f"access_log: cannot write {value!r}: {e}") from e
            self._open(path)

    def running(self):
        logging.getLogger("mitmproxy").addHandler(self.bad_requests)
        if hasattr(signal, "SIGHUP"):
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reopen)
            except (RuntimeError, NotImplementedError, ValueError):
                pass

    def done(self):
        logging.getLogger("mitmproxy").removeHandler(self.bad_requests)
        self._open(None)

    def _open(self, path: Path | None) -> None:
        if self.writer:
            self.writer.close()  # writes what is queued first
        self.writer = Writer(path) if path else None
        self.path = path

    def reopen(self) -> None:
        if self.writer:
            self.writer.call(self.writer.reopen)

    @command.command("accesslog.rotate")
    def rotate(self) -> None:
        """Rotate the access log like `squid -k rotate`: access.log becomes access.log.0, and so on."""
        if self.writer:
            self.writer.call(functools.partial(rotate_files, self.path, ctx.options.logfile_rotate, self.writer))

    def write(self, record: Record) -> None:
        if self.writer:
            self.writer.put(self.format(record))

    # --- HTTP ---------------------------------------------------------
    # A client can be gone by the time a hook runs here (it left while an earlier addon's hook was
    # awaited): its disconnect was handled already, so it is noted nowhere, or nothing would remove it.
    def note_client(self, flow) -> None:
        client = flow.client_conn
        if client.timestamp_end is None:
            self.seen.add(client.id)  # the id: a str hashes in C, a Connection in Python
        if self.combined and isinstance(flow, http.HTTPFlow):  # before anonymization changes them
            if len(self.client_fields) >= LOGGED_MAX:  # (flows that were never logged)
                self.client_fields.clear()
            self.client_fields[flow.id] = _referer_agent(flow.request)

    requestheaders = note_client  # loaded alone; the suite calls it once, first

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if not streams.may_stream(resp, self.late_streams):
            return  # buffered whole: its size is known
        if flow.request.method == "HEAD":
            return

        def counting(inner):  # now, or when mitmproxy streams a body of unknown length past stream_large_bodies
            flow.metadata[meta.SENT_BYTES] = 0

            def count(chunk: bytes):
                out = inner(chunk) if inner else chunk
                flow.metadata[meta.SENT_BYTES] += len(out) if isinstance(out, bytes) else sum(map(len, out))
                return out
            return count
        streams.wrap(resp, counting)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:  # an upgrade to a WebSocket: logged when the session ends
            return
        self._log_http(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        # one line for the whole session, as Squid logs a tunnel: its duration, and the bytes of the
        # messages sent to the client after the 101's head (frame headers not counted)
        flow.metadata[meta.SENT_BYTES] = sum(len(m.content) for m in flow.websocket.messages if not m.from_client)
        self._log_http(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(meta.RECOVERED):  # answered after all (recover.py): logged in `response`
            return
        message = flow.error.msg if flow.error else ""
        if any(words in message for words in REFUSED_REQUEST):
            # mitmproxy refused the request's framing (validate_inbound_headers: Content-Length with
            # Transfer-Encoding, two lengths...: request smuggling), its scheme or its CONNECT, and
            # answered 400 itself, whatever an addon decided: logged as the invalid request it is, not
            # as an origin's failure or a denial the client never got
            flow.metadata[meta.CODE] = "NONE_NONE"
            flow.metadata[meta.HIER] = "HIER_NONE"
            self._log_http(flow, sent=mitmproxy_error_page(_framing_error(flow.request) or message, 400))
            return
        resp = flow.response
        unsent = resp is None or not (resp.stream or flow.metadata.get(meta.LOCAL))
        if unsent and not _client_gone(flow):
            # The origin failed before its response was complete (none of it had been sent: it was not
            # streamed) and mitmproxy sent its own 502 page instead. A response it refused (invalid
            # framing) stays in the flow for mitmweb; the log says what the client got.
            # decided before the page is put in the flow, which would look like an upstream answer
            flow.metadata.setdefault(meta.HIER, meta.forwarded(flow) if meta.peer(flow) else "HIER_NONE")
            sent = mitmproxy_error_page(message)
            if flow.response is None:
                flow.response = sent
            self._log_http(flow, sent=sent)
        else:
            self._log_http(flow, aborted=True)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        if client.timestamp_end is not None:  # gone: no tunnel will follow, nor any other hook
            flow.metadata.setdefault(meta.CODE, "NONE_NONE")
            self._log_http(flow)
            return
        self.seen.add(client.id)
        if flow.response and flow.response.status_code >= 300:  # refused by an earlier addon
            self._log_http(flow)
        else:
            self.connects[client] = flow

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self.connects.pop(flow.client_conn, None)
        flow.metadata.setdefault(meta.CODE, "NONE_NONE")
        if flow.metadata.get(meta.HIER) is None and _is_ip(flow.request.host):
            flow.metadata[meta.HIER] = "HIER_DIRECT"
            flow.metadata.setdefault(meta.PEER, flow.request.host)
        self._log_http(flow)

    def _first_time(self, flow) -> bool:
        """True the first time a flow is to be logged. Only the ids of the last LOGGED_MAX to
        2 * LOGGED_MAX flows are kept: a flow fires its last hooks soon after it is logged, and a
        keep-alive connection can carry any number of flows."""
        fid = flow.id
        if fid in self.logged or fid in self.logged_before:
            return False
        if len(self.logged) >= LOGGED_MAX:
            self.logged_before, self.logged = self.logged, set()
        self.logged.add(fid)
        return True

    def _log_http(self, flow: http.HTTPFlow, aborted: bool = False, sent: http.Response | None = None) -> None:
        if not self._first_time(flow):
            return
        if self.connects and flow.client_conn in self.connects and flow.request.method != "CONNECT":
            self.intercepted.add(flow.client_conn)
        if self.writer:  # the record is built only for a log that is written
            self.write(http_record(flow, self.strip_query, aborted, combined=self.combined, sent=sent,
                                   client_fields=self.client_fields.pop(flow.id, None)))

    # --- raw TCP --------------------------------------------------------
    def next_layer(self, nextlayer) -> None:
        # A connection mitmproxy passes through untouched (ignore_hosts) makes no
        # flow, so nothing could log it. Relay it with a flow instead (still
        # untouched: a TCP layer only copies bytes) and keep only a byte count.
        # Scripts run before mitmproxy's own NextLayer addon, so its ignore
        # test is asked here; without it (other mitmproxy versions) such
        # tunnels are logged from their CONNECT, without a size.
        if nextlayer.layer is not None or nextlayer.context.client.transport_protocol != "tcp":
            return
        decider = ctx.master.addons.get("nextlayer")
        try:
            ignore = decider._ignore_connection(nextlayer.context, nextlayer.data_client(), nextlayer.data_server())
        except Exception:  # NeedsMoreData: decided on a later call; or no such method
            return
        if ignore:
            nextlayer.layer = layers.TCPLayer(nextlayer.context)
            nextlayer.layer.flow.metadata[meta.PASSTHROUGH] = True
            nextlayer.layer.flow.metadata[meta.SENT_BYTES] = 0

    tcp_start = note_client

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        if flow.metadata.get(meta.PASSTHROUGH):
            last = flow.messages[-1]
            if not last.from_client:
                flow.metadata[meta.SENT_BYTES] += len(last.content)
            del flow.messages[:-1]  # a tunnel can be long: do not keep its bytes

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        self._log_tcp(flow)

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        connected = flow.server_conn.timestamp_tcp_setup is not None
        self._log_tcp(flow, None if connected else "NONE_NONE", 200 if connected else 503)

    def _log_tcp(self, flow: tcp.TCPFlow, code: str | None = None, status: int = 200) -> None:
        if not self._first_time(flow):
            return
        connect = self.connects.get(flow.client_conn)
        if connect is not None:
            self.tunnelled.add(flow.client_conn)
            flow.metadata.setdefault(meta.USER, meta.user(connect))
        self.write(tcp_record(flow, code, status))

    # --- connections ----------------------------------------------------
    def client_disconnected(self, client) -> None:
        connect = self.connects.pop(client, None)
        tunnelled, intercepted = client in self.tunnelled, client in self.intercepted
        self.tunnelled.discard(client)
        self.intercepted.discard(client)
        seen = client.id in self.seen
        self.seen.discard(client.id)
        if connect is not None and not tunnelled:  # a tunnel was logged by its TCP flow
            if intercepted:
                # Each inner request was logged; the CONNECT itself as a bumping Squid does.
                connect.metadata.setdefault(meta.CODE, "NONE_NONE")
            self._log_http(connect)
        elif (bad := self.bad_requests.bad.pop(tuple(client.peername or ()), None)) is not None:
            self.write(bad_request_record(client, bad))
        elif not seen and self._is_http_listener(client):
            self.write(Record(
                end=time.time(), elapsed_ms=_elapsed(client), client=_ip(client.peername),
                code="NONE_NONE", status=0, size=0, method="-",
                url="error:transaction-end-before-headers"))

    def socks5_auth(self, data) -> None:
        """A SOCKS5 login mitmproxy's proxyauth refused (it runs before scripts) makes no flow: logged
        as a refused login, so that failed attempts show as with HTTP's 407."""
        if data.valid:
            return
        client = data.client_conn
        self.write(Record(
            end=time.time(), elapsed_ms=_elapsed(client), client=_ip(client.peername), code="TCP_DENIED",
            status=407, size=0, method="-", url="error:socks5-authentication", user=data.username or "-"))

    def server_connect_error(self, data) -> None:
        # With the eager connection_strategy, socks5, transparent and reverse listeners connect before any
        # flow: a failure there makes none, and nothing else would log it. Logged as Squid logs a failed
        # CONNECT. (A flow's own failed connection is logged with the flow; the client is then seen.)
        client = data.client
        if client.id in self.seen or self._is_http_listener(client) or not data.server.address:
            return
        self.seen.add(client.id)
        host, port = data.server.address[:2]
        self.write(Record(
            end=time.time(), elapsed_ms=_elapsed(client), client=_ip(client.peername),
            code="NONE_NONE", status=503, size=0, method="CONNECT", url=meta.hostport(str(host), port)))

    @staticmethod
    def _is_http_listener(client) -> bool:
        mode = getattr(client, "proxy_mode", None)
        return getattr(mode, "type_name", "") in ("regular", "upstream")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def mitmproxy_error_page(message: str, status: int = 502) -> http.Response:
    """The page mitmproxy sends an HTTP/1 client in place of an origin's failed response (502), or for a
    request it refuses (400), as its _http1.make_error_response builds it, so that the log has its size."""
    try:
        from mitmproxy.proxy.layers.http._base import format_error
        from mitmproxy import version
        return http.Response.make(status, format_error(status, message), http.Headers(
            Server=version.MITMPROXY, Connection="close", Content_Type="text/html"))
    except ImportError:  # another mitmproxy layout: the head alone
        return http.Response.make(status, b"", {"Content-Type": "text/html"})


def _framing_error(request: http.Request) -> str | None:
    """What mitmproxy's HTTP/1 reader said of a request head whose length it could not tell (two
    Content-Length fields), in the 400 it sent before its own validation said more (the flow's error)."""
    try:
        from mitmproxy.net.http.http1 import expected_http_body_size
        expected_http_body_size(request)
    except ValueError as e:
        return str(e)
    except Exception:  # another mitmproxy layout
        pass
    return None


def _client_gone(flow) -> bool:
    msg = (flow.error.msg if flow.error else "").lower()
    if "client disconnected" in msg or "killed" in msg:
        return True
    if msg.startswith(("stream reset by client", "stream closed by client")):
        # An HTTP/2 or /3 stream the client cancelled, its connection kept. mitmproxy words a reset
        # by the origin the same way: over h2/h3 to the origin, only a cancel is taken as the client's.
        return getattr(flow.server_conn, "alpn", None) not in (b"h2", b"h3") or "cancel" in msg
    # a client that closed before the end of its request (an upload it gave up): mitmproxy's
    # message is then the one of an origin closing early ("peer closed connection...")
    return flow.request.timestamp_end is None and not flow.client_conn.state & ConnectionState.CAN_READ


def _ip(peer) -> str:
    ip = str(peer[0]) if peer else "-"
    return ip[7:] if ip.startswith("::ffff:") else ip


def _elapsed(client) -> int:
    start = client.timestamp_start or time.time()
    return max(0, int((time.time() - start) * 1000))


addons = [AccessLog()]
