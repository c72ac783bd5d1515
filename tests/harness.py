"""Real parts for end-to-end tests: a mitmdump subprocess and a loopback origin.

Everything listens on 127.0.0.1 only. Fixtures wrapping these are in conftest.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

ROOT = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    """The shared test data (../shared beside the project). RELAIS_SHARED names it elsewhere; a clone
    made with `git clone /work/main /tmp/x` finds the one beside the project it was cloned from."""
    if os.environ.get("RELAIS_SHARED"):
        return Path(os.environ["RELAIS_SHARED"])
    here = ROOT.parent / "shared"
    if here.is_dir():
        return here
    try:
        origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    beside = Path(origin).parent / "shared" if origin and Path(origin).is_dir() else None
    return beside if beside is not None and beside.is_dir() else here


SHARED = _shared()
BIN = Path(sys.executable).parent
MITMDUMP = str(BIN / "mitmdump") if (BIN / "mitmdump").exists() else "mitmdump"


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports: all held at once while chosen (one by one, the kernel may hand out
    a port it just gave, and two listeners of one mitmdump then collide)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@contextmanager
def closed_port(host: str = "127.0.0.1"):
    """A port that refuses connections while the block runs: a socket bound to it without listen()
    (connect() gets ECONNREFUSED), which no other process can take meanwhile, as it could a
    free_port() (then a connection to it would be accepted). Yields (port, socket): the socket's
    listen() brings the port up."""
    with hold_port(0, host) as s:
        yield s.getsockname()[1], s


def hold_port(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to a port a listener of the test has just released, without listen(): connections
    to it are still refused, and no other process can be given the port (nor a connect() from it to
    itself) while the socket is open, as it could once the port is free. Close it when done."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the port's connections in TIME_WAIT
    s.bind((host, port))
    return s


# --- origin -----------------------------------------------------------------

@dataclass
class Seen:
    """One request as the origin received it."""
    method: str
    path: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes
    client: str
    version: str = "HTTP/1.1"  # the request line's


CLOSE = object()  # a route's body that makes the origin close the connection without responding
RESET = object()  # ... or reset it (RST)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):  # keep test output clean
        pass

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        origin = self.server.origin
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                    list(self.headers.items()), body, self.client_address[0], self.request_version)
        with origin.lock:
            origin.requests.append(seen)
            path = urlsplit(self.path).path
            origin.hits[path] = origin.hits.get(path, 0) + 1
        status, headers, payload = origin.respond(seen)
        if payload is CLOSE or payload is RESET:  # no response at all: the connection ends
            self.close_connection = True
            if payload is RESET:  # closed at once with linger 0: RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            return
        if callable(payload):  # a generator of chunks, sent slowly
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            sent = 0
            try:
                for chunk in payload():
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
            except OSError:
                pass
            promised = next((int(v) for k, v in headers.items() if k.lower() == "content-length"), sent)
            if sent < promised:
                self.close_connection = True  # fewer bytes than promised: the origin died mid-body
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_TRACE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Origin:
    """A loopback HTTP(S) origin that counts and records what it receives.

    Built-in routes:
      /size/N            N bytes of 'x' (application/octet-stream)
      /headers           JSON of the request headers it received
      /status/N          an empty response with status N
      /slow/N?rate=B     N bytes sent B bytes per 0.1 s
      anything else      'hello <path>' as text/plain
    Query parameters `h.Name=value` add response headers, `status=N` sets
    the status. `origin.route(path, fn)` overrides a path with fn(seen) ->
    (status, headers, body); a body may be a function returning the chunks to send (a
    generator), and fewer bytes than its Content-Length end the connection, cut short.
    """

    def __init__(self, tls: tuple[str, str] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.requests: list[Seen] = []
        self.hits: dict[str, int] = {}
        self.routes: dict[str, callable] = {}
        self.lock = threading.Lock()
        self.server = _Server((host, port), Handler)
        self.server.origin = self
        self.tls = tls is not None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def route(self, path: str, fn) -> None:
        self.routes[path] = fn

    def respond(self, seen: Seen):
        url = urlsplit(seen.path)
        query = dict(parse_qsl(url.query))
        extra = {k[2:]: v for k, v in query.items() if k.startswith("h.")}
        if url.path in self.routes:
            return self.routes[url.path](seen)
        parts = url.path.strip("/").split("/")
        status = int(query.get("status", 200))
        if parts[0] == "size" and len(parts) > 1:
            return status, {"Content-Type": "application/octet-stream", **extra}, b"x" * int(parts[1])
        if parts[0] == "headers":
            body = json.dumps({"headers": seen.headers, "client": seen.client}).encode()
            return status, {"Content-Type": "application/json", **extra}, body
        if parts[0] == "status" and len(parts) > 1:
            return int(parts[1]), {"Content-Type": "text/plain", **extra}, b""
        if parts[0] == "slow" and len(parts) > 1:
            total, rate = int(parts[1]), int(query.get("rate", 2000))

            def chunks():
                sent = 0
                while sent < total:
                    n = min(rate, total - sent)
                    yield b"x" * n
                    sent += n
                    time.sleep(0.1)
            return status, {"Content-Type": "application/octet-stream", "Content-Length": str(total), **extra}, chunks
        return status, {"Content-Type": "text/plain", **extra}, f"hello {url.path}".encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def scripted_server(*answers: bytes):
    """A loopback TCP server (yields its port) that answers the first bytes of each connection with
    the next of `answers`, as raw bytes, and closes it; a connection that sends nothing (the errors
    addon's connection check) takes none."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)  # so that the thread sees `stop` soon
    todo = list(answers)
    stop = threading.Event()

    def serve():
        while todo and not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    if conn.recv(65536):
                        conn.sendall(todo.pop(0))
                except OSError:
                    pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


class H2Origin:
    """A loopback HTTPS origin that speaks HTTP/2 only (ALPN h2, the h2 library mitmproxy uses): every
    GET gets 200 'h2 hello <path>' with Cache-Control max-age=60 (after a 103 Early Hints for
    paths starting /hints, a 101 for /switch), one stream at a time. `requests`
    holds the header lists it received, and `errors` what it found wrong in them (the h2 library
    refuses a request with an upper-case field name, as RFC 9113 8.2.1 says)."""

    def __init__(self, tls: tuple[str, str]):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        ctx.set_alpn_protocols(["h2"])
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.requests: list[list[tuple[str, str]]] = []
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events
        import h2.exceptions
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                s.settimeout(30)
                c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
                c.initiate_connection()
                s.sendall(c.data_to_send())
                heads = {}
                while True:
                    data = s.recv(65536)
                    if not data:
                        return
                    try:
                        events = c.receive_data(data)
                    except h2.exceptions.ProtocolError as e:
                        self.errors.append(str(e))
                        s.sendall(c.data_to_send())
                        return
                    for ev in events:
                        if isinstance(ev, h2.events.RequestReceived):
                            heads[ev.stream_id] = list(ev.headers)
                            self.requests.append(heads[ev.stream_id])
                        elif isinstance(ev, h2.events.StreamEnded):
                            path = dict(heads.pop(ev.stream_id))[":path"]
                            if path.startswith("/hints"):  # a 103 Early Hints first
                                c.send_headers(ev.stream_id, [(":status", "103"), ("link", "</s.css>; rel=preload")])
                            if path.startswith("/switch"):  # a 101, which HTTP/2 does not allow: to be dropped
                                c.send_headers(ev.stream_id, [(":status", "101")])
                            body = f"h2 hello {path}".encode()
                            c.send_headers(ev.stream_id, [(":status", "200"), ("content-type", "text/plain"),
                                                          ("cache-control", "max-age=60"),
                                                          ("content-length", str(len(body)))])
                            c.send_data(ev.stream_id, body, end_stream=True)
                    s.sendall(c.data_to_send())
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.sock.close()


def make_cert(folder: Path, name: str = "127.0.0.1") -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl CLI)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True)
    return str(cert), str(key)


# --- proxy ------------------------------------------------------------------

def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    """An htpasswd file of bcrypt hashes: the one kind that mitmproxy 11 (passlib), recent mitmproxy
    (12.3.1: bcrypt and SHA-1 only) and Squid's basic_ncsa_auth all read. Cost 4: tests check many logins."""
    try:
        import bcrypt  # a dependency of recent mitmproxy (12.3.1)
        hashed = lambda pw: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()
    except ImportError:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # Python 3.11 and 3.12, where mitmproxy 11 runs; libxcrypt knows bcrypt
        hashed = lambda pw: crypt.crypt(pw, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    path.write_text("".join(f"{user}:{hashed(pw)}\n" for user, pw in users.items()))


def hermetic_dns(folder: Path) -> list[str]:
    """A command prefix that gives the proxy a resolver on 127.0.0.1, where none answers.

    Names the tests use resolve from /etc/hosts (localhost) or not at all
    (nosuchhost.invalid): no test may send a DNS query off the machine.
    Needs root (a private mount namespace); without it, the prefix is empty.
    """
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return []
    resolv = folder / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    return ["unshare", "--mount", "--", "sh", "-c", f'mount --bind "{resolv}" /etc/resolv.conf && exec "$@"', "sh"]



class Proxy:
    """A real `mitmdump -s <script>` subprocess listening on free loopback ports.

    `modes` are mitmproxy mode specs without the @port; each gets a free port,
    listed in `ports` in the same order (`port` is the first).
    """

    def __init__(self, tmp: Path, modes=("regular",), script: str | None = "addons/all.py",
                 options: dict[str, object] | None = None, args: list[str] = (),
                 env: dict[str, str] | None = None, wait: bool = True, prefix: list[str] = (),
                 listen_host: str = "127.0.0.1", ports: list[int] | None = None, program: list[str] = (MITMDUMP,)):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.confdir = self.tmp / "conf"
        self.access_log = self.tmp / "access.log"
        opts = {"confdir": str(self.confdir), "access_log": str(self.access_log),
                "ssl_insecure": "true", "termlog_verbosity": "info"}
        if script in ("addons/all.py", "addons/acl.py"):
            # Squid's default policy refuses CONNECT to the high ports of the test origins.
            opts["policy"] = str(ROOT / "tests" / "policies" / "test.yaml")
        opts.update({k: v for k, v in (options or {}).items()})
        self.output = self.tmp / "mitmdump.out"
        # A free port may be taken by another process before mitmdump binds it: then mitmdump
        # exits, and another set of free ports is tried (ports given by the caller are not changed).
        for attempt in range(1 if ports else 3):
            self.ports = list(ports) if ports else free_ports(len(modes))
            self.port = self.ports[0]
            self._start(program, modes, script, opts, args, env, prefix, listen_host)
            if not wait:
                return
            try:
                self._wait_started(other_netns=bool(prefix))  # then its ports cannot be probed from here
                return
            except Exception:
                self.stop()
                if ports or attempt == 2 or "address already in use" not in self.text():
                    raise

    def _start(self, program, modes, script, opts, args, env, prefix, listen_host) -> None:
        cmd = [*(prefix or hermetic_dns(self.tmp)), *program, "--listen-host", listen_host]
        for mode, port in zip(modes, self.ports):
            cmd += ["--mode", f"{mode}@{port}"]
        if script:
            cmd += ["-s", str(ROOT / script)]
        for k, v in opts.items():
            if v is None:
                continue
            if isinstance(v, bool):
                v = "true" if v else "false"
            cmd += ["--set", f"{k}={v}"]
        cmd += list(args)
        self.cmd = cmd
        self._out = open(self.output, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.tmp), stdout=self._out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True)

    def _wait_started(self, other_netns: bool) -> None:
        if other_netns:  # wait for its own word
            self.wait_output("listening at", timeout=30)
            return
        for port in self.ports:
            self._wait(port)
        # Something listens on each port; this mitmdump says it is the one (another process may
        # have taken a port it then failed to bind).
        for port in self.ports:
            self.wait_output(f":{port}.", timeout=10)

    def _wait(self, port: int, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited {self.proc.returncode}:\n{self.text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"mitmdump not listening on {port}:\n{self.text()}")

    def wait_output(self, text: str, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.1)
        raise TimeoutError(f"{text!r} not in mitmdump output:\n{self.text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    def text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self, at_least: int = 1, timeout: float = 10.0, path: Path | None = None) -> list[str]:
        """Access-log lines, waiting until there are `at_least` of them."""
        path = path or self.access_log
        end = time.monotonic() + timeout
        while True:
            try:
                lines = [l for l in path.read_text(errors="surrogateescape").splitlines() if l.strip()]
            except FileNotFoundError:
                lines = []
            if len(lines) >= at_least or time.monotonic() >= end:
                return lines
            time.sleep(0.05)

    def wait_lines(self, needle: str, count: int = 1, timeout: float = 10.0, path: Path | None = None) -> list[str]:
        """The access-log lines containing `needle`, once there are at least `count` of them.

        The log is written in batches, a little after each transaction: wait
        for the lines a test is about, never for a total number of lines.
        """
        end = time.monotonic() + timeout
        while True:
            lines = self.log_lines(0, timeout=0, path=path)
            found = [line for line in lines if needle in line]
            if len(found) >= count:
                return found
            if time.monotonic() >= end:
                raise AssertionError(f"fewer than {count} access.log lines with {needle!r}:\n" + "\n".join(lines) +
                                     "\n--- mitmdump output ---\n" + self.text()[-3000:])
            time.sleep(0.05)

    def log_line(self, needle: str, timeout: float = 10.0) -> str:
        """The first access-log line containing `needle`, waiting for it."""
        return self.wait_lines(needle, 1, timeout)[0]

    def signal(self, sig=signal.SIGHUP) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._out.close()


def cache_rows(cache_dir, sql: str, params: tuple = ()) -> list[tuple]:
    """The rows of a read-only query on cache_dir's disk cache database; none while it does not exist."""
    import sqlite3
    try:
        con = sqlite3.connect(f"file:{Path(cache_dir) / 'cache.db'}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def wait_stored(cache_dir, needle: str, since: float = 0.0, timeout: float = 10.0) -> None:
    """Until cache_dir's disk cache holds an entry whose key contains `needle`, stored after `since`
    (time.time()). The disk writer commits 0.2 s or more after a response is stored, and until it says
    so the proxy does not read that key from the disk: a request sent meanwhile is a miss."""
    end = time.monotonic() + timeout
    while not cache_rows(cache_dir, "SELECT 1 FROM Cache WHERE raw = 1 AND key >= 'm|' AND key < 'm}' "
                                    "AND instr(key, ?) > 0 AND store_time > ?", (needle, since)):
        if time.monotonic() >= end:
            raise AssertionError(f"no entry with {needle!r} stored in {cache_dir} after {timeout}s")
        time.sleep(0.05)
    time.sleep(0.1)  # the writer's acknowledgement reaches the proxy right after its commit


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started in a session of its own, and its children: SIGINT, SIGKILL after 15 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def curl(*args: str, timeout: float = 20, input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    """Run curl; returns the CompletedProcess (stdout as bytes). input_bytes goes to its stdin."""
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                          capture_output=True, timeout=timeout + 5, input=input_bytes)


def family(pid: int) -> list[int]:
    """pid and its child processes (the cache's disk writer)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return [pid, *kids]


def peak_rss_mb(pid: int) -> float:
    """The most resident memory a process and its child processes (the cache's disk writer) have had
    so far, in MB: a body held only a moment counts."""
    total = 0.0
    for p in family(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def curl_status(*args: str, timeout: float = 20) -> int:
    r = curl("-o", "/dev/null", "-w", "%{http_code}", *args, timeout=timeout)
    return int(r.stdout or 0)


def fill_disk(folder: Path) -> Path:
    """Fill the (small) file system of `folder` to the last byte with a file, returned: delete it to
    make room again."""
    filler = Path(folder) / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            for _ in range(1 << 20):  # 4 GB at most: a small tmpfs is full long before
                f.write(b"x" * 4096)
        except OSError:
            pass
    return filler
