"""Access control: Squid's acl + http_access (+ ssl_bump) from a YAML policy or a squid.conf.

    mitmdump -s addons/acl.py --set policy=policies/default.yaml

Where decisions are made:
  * HTTP requests in `requestheaders` (before the body is read), in every mode;
    in transparent/socks5/reverse mode the acls see the Host header's site (one that
    names no host[:port] is refused: 400 ERR_INVALID_REQ);
  * CONNECT in `http_connect` (403 page, no tunnel);
  * TLS without a CONNECT (transparent, socks5) at `tls_clienthello` by SNI;
    `ssl_bump` rules pick splice (pass through) / bump (intercept) / terminate;
  * raw TCP streams (socks5, transparent, reverse tcp) at `tcp_start`, as a
    CONNECT to host:port; a denied stream is really closed (client and server
    sockets) and nothing it sent is forwarded.

Users come from mitmproxy's `proxyauth`. When a policy is loaded, Relais asks
for credentials the way Squid does: only when the rules reach a proxy_auth
acl (407 ERR_CACHE_ACCESS_DENIED with Proxy-Authenticate; 401 in reverse
mode); mitmproxy's blanket 407 is replaced by the policy's answer.

Commands: `policy.reload`. The policy file (and its list files) are watched.
The matching itself lives in aclrules.py (pure, unit-tested).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import time
import weakref
from pathlib import Path

from mitmproxy import command, connection, ctx, exceptions, http, tcp, tls
from mitmproxy.proxy import layers
from mitmproxy.proxy.layers.tcp import TcpEndHook, TcpStartHook
from mitmproxy.proxy.layers.tls import parse_client_hello

try:
    from addons import aclrules, answered, errorpage, meta
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import aclrules, answered, errorpage, meta

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = "policies/default.yaml"
PRECHECK_MODES = ("transparent", "socks5", "wireguard", "local")
REALM = "relais"
MARK = ":no_entry:"  # mitmweb marker of denied flows (the comment names the rule)
DNS_MAX = 10000  # names (and reverse lookups) whose DNS answers are cached
log = logging.getLogger(__name__)


def resolve_policy_path(value: str) -> Path:
    """The policy file: as given (relative to cwd), else relative to the project root."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = ROOT / p
    return alt if alt.exists() else p


class AccessControl:
    def __init__(self) -> None:
        self.policy: aclrules.Policy | None = None
        self.path: Path | None = None
        self.path_name = "None"
        self.stamp: dict[str, float] = {}
        self.watcher: asyncio.Task | None = None
        self.interval = 2.0
        self.conns: collections.Counter[str] = collections.Counter()
        self.tunnels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> CONNECT request
        self.tunnel_ids: set[str] = set()  # ids of clients whose CONNECT was allowed (a str hashes in C)
        self.denied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # client -> (decision, request)
        self.prechecked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> True
        self.dns: dict[str, tuple[float, tuple[str, ...]]] = {}
        self.answering = answered.hold()

    # --- options, loading, watching ---------------------------------------------
    def load(self, loader):
        loader.add_option(
            "policy", str, DEFAULT_POLICY,
            "Access policy: a YAML policy (acls, http_access, ssl_bump) or a squid.conf (*.conf: its acl, "
            "http_access and ssl_bump lines, and those of the files it includes). Relative paths are looked "
            "up in the current folder, then in the Relais folder.",
        )
        loader.add_option(
            "policy_watch", str, "2",
            "Seconds (decimals allowed) between checks of the policy file, the files it includes and its list "
            "files for changes; "
            "0 disables the watch (use the policy.reload command).",
        )
        # a request denied while mitmproxy streams its body (stream_large_bodies) still gets its answer
        self.answering.take()

    def configure(self, updated):
        if "policy_watch" in updated:
            try:
                self.interval = float(ctx.options.policy_watch)
            except ValueError:
                self.interval = -1.0
            if not self.interval >= 0:  # also refuses nan
                raise exceptions.OptionsError(
                    f"policy_watch: must be a number of seconds, 0 or more, not {ctx.options.policy_watch!r}")
        if "policy" in updated:
            value = ctx.options.policy
            if not value.strip():
                raise exceptions.OptionsError("policy: empty path; Relais needs a policy (it is never an open proxy)")
            path = resolve_policy_path(value)
            try:
                self._install(path)
            except aclrules.PolicyError as e:
                raise exceptions.OptionsError(f"policy: {value!r} rejected: {e}") from None
        if "policy_watch" in updated and self.watcher:
            self._start_watch()

    def running(self):
        self._start_watch()

    def done(self):
        if self.watcher:
            self.watcher.cancel()
            self.watcher = None
        self.answering.release()

    def _install(self, path: Path) -> None:
        before = self._stamps(path)  # taken before reading: an edit made meanwhile is seen next poll
        policy = aclrules.load(path)
        stamp = self._stamps(path, policy)
        stamp.update(before)
        self.policy, self.path, self.stamp = policy, path, stamp
        self.path_name = str(path)
        log.info("policy %s: %d acls, %d http_access rules, %d ssl_bump rules", path, len(policy.acls),
                 len(policy.http_access), len(policy.ssl_bump))
        for note in policy.notes:
            log.warning("policy %s", note)

    @staticmethod
    def _stamps(path: Path, policy: aclrules.Policy | None = None, also=()) -> dict[str, float]:
        files = {str(path), *also}
        if policy:
            files.update(policy.includes)
            for acl in policy.acls.values():
                for ln in acl.lines:
                    files.update(f for _, f, _ in ln.values if f)
        out = {}
        for f in files:
            try:
                out[f] = os.stat(f).st_mtime_ns
            except OSError:
                out[f] = -1
        return out

    def _start_watch(self) -> None:
        if self.watcher:
            self.watcher.cancel()
            self.watcher = None
        if self.interval > 0:
            try:
                self.watcher = asyncio.get_running_loop().create_task(self._watch())
            except RuntimeError:  # no loop (unit tests)
                pass

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            # the files stamped last time too: after a refused reload, those the refused version named
            if self.path and self._stamps(self.path, self.policy, self.stamp) != self.stamp:
                self._reload()

    @command.command("policy.reload")
    def reload(self) -> None:
        """Reload the policy file; a broken file is rejected and the last good policy stays."""
        if (error := self._reload()) is not None:
            raise exceptions.CommandError(f"policy.reload: kept the previous policy: {error}")

    def _reload(self) -> aclrules.PolicyError | None:
        if not self.path:
            return None
        try:
            self._install(self.path)
        except aclrules.PolicyError as e:
            # not retried until a file changes again, a file the refused version included among them
            self.stamp = self._stamps(self.path, self.policy, getattr(e, "includes", ()))
            log.error("policy rejected, the last good policy stays in force: %s", e)
            return e
        return None

    # --- connections ---------------------------------------------------------------
    def client_connected(self, client: connection.Client) -> None:
        self.conns[_ip(client.peername)] += 1

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnel_ids.discard(client.id)
        ip = _ip(client.peername)
        self.conns[ip] -= 1
        if self.conns[ip] <= 0:
            del self.conns[ip]

    async def server_connect(self, data) -> None:
        client = data.client
        if client in self.denied:  # lazy strategy: never connect for a denied stream
            data.server.error = f"denied by {self.denied[client][0].rule}"
            return
        if (self.policy is None or client in self.tunnels or client in self.prechecked
                or getattr(client.proxy_mode, "type_name", "") not in PRECHECK_MODES or not data.server.address):
            return
        # Transparent/socks5: before connecting upstream, deny what the connection alone already decides.
        self.prechecked[client] = True
        req = None
        try:
            req = self._tunnel_request(client, data.server.address, _user_of(client))
            await self._resolve(req)
            # a SOCKS request naming a host: that name is where it goes, and what the rules judge
            named = client.proxy_mode.type_name == "socks5" and not _is_ip(str(data.server.address[0]))
            d = self.policy.precheck(req, aclrules.NAMED_CONNECTION_TYPES if named else aclrules.CONNECTION_TYPES)
        except Exception as e:
            d = _failed(e)  # denied, and logged as any denial
        if d is not None and not d.allowed:
            data.server.error = f"denied by {d.rule}"
            await self._deny_connection(client, data.server, req, d, close_server=False, reply=_socks_refusal(client))

    # --- HTTP ------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow):
        return self._decide(flow, connect=False)

    def http_connect(self, flow: http.HTTPFlow):
        return self._decide(flow, connect=True)

    def _decide(self, flow: http.HTTPFlow, connect: bool):
        if self.policy is None or not self._undecided(flow):
            return None
        try:
            req = self._http_request(flow)
            if not self._cached(req):
                return self._decide_later(flow, req, connect)
            self._verdict(flow, req, connect)  # the common case stays synchronous: no coroutine
        except InvalidHost as e:
            self._refuse_invalid(flow, e)
        except Exception as e:
            self._deny_on_error(flow, e)
        return None

    async def _decide_later(self, flow: http.HTTPFlow, req: aclrules.Request, connect: bool) -> None:
        try:
            await self._resolve(req)
            self._verdict(flow, req, connect)
        except Exception as e:
            self._deny_on_error(flow, e)

    def _verdict(self, flow: http.HTTPFlow, req: aclrules.Request, connect: bool) -> None:
        if self._apply(flow, req) and connect:  # the tunnel's TCP flow gets the CONNECT's verdict
            self.tunnels[flow.client_conn] = (req, flow.metadata[meta.ACL], flow.metadata[meta.ACLS])
            self.tunnel_ids.add(flow.client_conn.id)

    def _refuse_invalid(self, flow: http.HTTPFlow, e: InvalidHost) -> None:
        """Squid's 400 for a request whose Host names no host[:port] where the Host is what the rules
        judge (mitmproxy's regular mode refuses those itself): the acls would see a URL the request
        does not go to (Host: x/y makes url_regex ^http://[^/]+/path/ miss)."""
        log.info("access control: %s; refused", e)
        answered.refuse(flow, "ERR_INVALID_REQ", "acl", str(e), url="")
        flow.marked = flow.marked or MARK

    def _deny_on_error(self, flow: http.HTTPFlow, e: Exception) -> None:
        d = _failed(e)
        flow.response = errorpage.make("ERR_ACCESS_DENIED", detail=d.rule)  # no URL: it may be what failed
        answered.refuse_body(flow)
        self._mark(flow, None, d)

    def _undecided(self, flow: http.HTTPFlow) -> bool:
        """False when an earlier addon answered; mitmproxy's proxyauth challenge is taken over."""
        resp = flow.response
        if resp is None:
            return True
        if (resp.status_code in (401, 407) and "proxyauth" not in flow.metadata and ctx.options.proxyauth
                and meta.LOCAL not in flow.metadata
                and ("Proxy-Authenticate" in resp.headers or "WWW-Authenticate" in resp.headers)):
            flow.response = None  # the policy decides whether credentials are needed, as Squid does
            return True
        return False

    def _apply(self, flow: http.HTTPFlow, req: aclrules.Request) -> bool:
        d, acls = self.policy.verdict(req)
        flow.metadata[meta.ACL] = {"action": d.action, "rule": d.rule, "policy": self.path_name}
        flow.metadata[meta.ACLS] = list(acls)
        flow.metadata[meta.ACL_NAMES] = self.policy.names
        if req.user:
            flow.metadata.setdefault(meta.USER, req.user)
        if d.allowed:
            meta.add_comment(flow, f"allowed by: {d.rule}")
            return True
        url = req.url
        if d.auth:
            page = "ERR_CACHE_ACCESS_DENIED"
            reverse = meta.mode_name(flow) not in ("regular", "upstream")
            header = ("WWW-Authenticate" if reverse else "Proxy-Authenticate")
            flow.response = errorpage.make(page, url, detail=d.rule, extra_headers={header: f'Basic realm="{REALM}"'},
                                           status=401 if reverse else None)
        else:
            page = "ERR_ACCESS_DENIED"
            flow.response = errorpage.make(page, url, detail=d.rule)
        answered.refuse_body(flow)
        flow.metadata[meta.CODE] = "TCP_DENIED"
        flow.metadata[meta.LOCAL] = "acl"
        flow.metadata[meta.ERROR] = page
        meta.add_comment(flow, f"denied by: {d.rule}")
        flow.marked = flow.marked or MARK
        return False

    def _http_request(self, flow: http.HTTPFlow) -> aclrules.Request:
        r = flow.request
        mode = meta.mode_name(flow)
        # Where the request names its site by Host: a connection to an address (transparent, a SOCKS
        # request naming an IP), a reverse proxy's, and inside a CONNECT tunnel (Squid builds a bumped
        # request's URL from Host: a site fronted by an allowed name is judged as itself). A SOCKS
        # request naming a host goes there whatever Host says: that name is judged.
        if mode == "socks5":
            tunnelled, by_host_header = False, _is_ip(r.host)  # (with TLS too: the ClientHello made a tunnel)
        else:
            tunnelled = mode in ("regular", "upstream") and flow.client_conn.id in self.tunnel_ids
            by_host_header = tunnelled or mode in ("transparent", "wireguard", "local", "reverse")
        site = None
        if by_host_header:
            try:
                site = meta.named_site(r)
            except ValueError:
                raise InvalidHost(f"invalid Host header: {r.host_header!r}") from None
        host = site[0] if site else r.host
        dst = (r.host,) if (tunnelled or mode in ("transparent", "wireguard", "local", "socks5")) and _is_ip(r.host) \
            else None  # the address the connection goes to
        method = r.method  # a property that decodes on every read
        if method == "CONNECT":
            url, path, proto = meta.hostport(r.host, r.port), "", "NONE"
        else:
            url = meta.pretty_url(r, site) if site else meta.request_url(r)
            path, proto = r.path, r.scheme.upper()
        headers = r.headers
        if r.data.authority and r.data.http_version in meta.LOWER_CASE_VERSIONS:
            # HTTP/2's Host is :authority, which wins over a host field (RFC 9113 8.3.1), as in mitmproxy's
            # host_header and what an HTTP/2 origin gets: req_header Host sees that one
            headers = headers.copy()
            headers["host"] = r.data.authority.decode("utf-8", "surrogateescape")
        return self._request(flow.client_conn, method=method, proto=proto, host=host, port=r.port,
                             path=path, url=url, headers=headers, user=meta.user(flow), dst_ips=dst)

    def _request(self, client, **kw) -> aclrules.Request:
        mode = getattr(client, "proxy_mode", None)
        sock = client.sockname or ("", 0)
        names = (getattr(mode, "type_name", "regular"), getattr(mode, "full_spec", ""), str(sock[1]))
        ip = _ip(client.peername)
        return aclrules.Request(src=ip, sni=client.sni, port_names=names, local_port=sock[1],
                                conns=self.conns.get(ip, 1), **kw)

    def _tunnel_request(self, client, address, user: str | None, name: str | None = None) -> aclrules.Request:
        """The request a connection stands for (raw stream, TLS ClientHello): a CONNECT to its
        address, shown by `name` (the SNI) when there is one."""
        host, port = str(address[0]), address[1]
        shown = name or host
        return self._request(client, method="CONNECT", proto="NONE", host=shown, port=port, url=meta.hostport(shown, port),
                             user=user, dst_ips=(host,) if _is_ip(host) else None)

    def _cached(self, req: aclrules.Request) -> bool:
        """Fills in the DNS answers the rules need from the cache; False if a lookup is still needed."""
        now = time.monotonic()
        if self.policy.uses_rdns and req.rdns is None and _is_ip(req.host):
            hit = self.dns.get(f"rev:{req.host.strip('[]')}")
            if not hit or hit[0] <= now:
                return False
            req.rdns = hit[1]
        if self.policy.uses_dst and req.dst_ips is None and req.host and not _is_ip(req.host):
            hit = self.dns.get(req.host)
            if not hit or hit[0] <= now:
                return False
            req.dst_ips = hit[1]
        return True

    async def _resolve(self, req: aclrules.Request) -> None:
        """DNS only when the policy's rules need it, as Squid: the addresses of a host name for dst acls,
        the name of an IP host for dstdomain/dstdom_regex without -n (both through the system
        resolver, cached 60 s)."""
        if self.policy.uses_rdns and req.rdns is None and _is_ip(req.host):
            req.rdns = await self._reverse(req.host.strip("[]"))
        if not self.policy.uses_dst or req.dst_ips is not None or _is_ip(req.host) or not req.host:
            return
        hit = self.dns.get(req.host)
        if hit and hit[0] > time.monotonic():
            req.dst_ips = hit[1]
            return
        try:
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(req.host, req.port or 80), 10)
            ips = tuple(dict.fromkeys(i[4][0] for i in infos))
        except (OSError, asyncio.TimeoutError, UnicodeError):
            ips = ()
        req.dst_ips = self._remember(req.host, ips)

    async def _reverse(self, ip: str) -> tuple[str, ...]:
        key = f"rev:{ip}"
        hit = self.dns.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        try:
            name, _ = await asyncio.wait_for(asyncio.get_running_loop().getnameinfo((ip, 0)), 10)
            names = ("none",) if _is_ip(name) else (name,)
        except (OSError, asyncio.TimeoutError, UnicodeError):
            names = ("none",)
        return self._remember(key, names)

    def _remember(self, key: str, answer: tuple[str, ...]) -> tuple[str, ...]:
        """Cache a DNS answer for 60 s; a forward proxy sees many names, so the cache stays bounded."""
        if len(self.dns) >= DNS_MAX:
            self.dns.clear()
        self.dns[key] = (time.monotonic() + 60, answer)
        return answer

    # --- TLS ---------------------------------------------------------------------------
    async def next_layer(self, nextlayer) -> None:
        """ssl_bump splice, decided from the ClientHello before mitmproxy makes a TLS layer.

        A spliced connection then becomes a plain TCP relay with a flow (its
        bytes untouched), which the access log logs as TCP_TUNNEL with its
        size; splicing later, at tls_clienthello, leaves no flow at all. When
        the ClientHello is not all there yet, tls_clienthello decides instead.
        """
        if self.policy is None or not self.policy.ssl_bump or nextlayer.layer is not None:
            return
        context = nextlayer.context
        client = context.client
        if client.transport_protocol != "tcp" or client in self.denied or _is_reverse(client):
            return
        data = nextlayer.data_client()
        if not data or data[0] != 0x16:  # not a TLS handshake record
            return
        try:
            hello = parse_client_hello(data)
        except ValueError:
            return
        if hello is None:
            return
        req, d = await self._tls_decision(client, context.server, hello.sni)
        if d is not None and not d.allowed:
            return  # tls_clienthello refuses it the usual way
        bump = self.policy.bump(req)
        if bump is not None and bump.action == "splice":
            layer = layers.TCPLayer(context)
            layer.flow.metadata[meta.PASSTHROUGH] = True
            layer.flow.metadata[meta.SENT_BYTES] = 0
            layer.flow.comment = f"spliced by: {bump.rule}"
            nextlayer.layer = layer

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self.policy is None:
            return
        client, server = data.context.client, data.context.server
        if client in self.denied or _is_reverse(client):
            return  # reverse listeners terminate TLS; their requests are decided one by one
        try:
            req, d = await self._tls_decision(client, server, data.client_hello.sni)
        except Exception as e:
            req, d = None, _failed(e)  # denied, and logged as any denial
        if d is not None and not d.allowed:
            data.ignore_connection = True
            await self._deny_connection(client, server, req, d)
            return
        bump = self.policy.bump(req)
        if bump is None or bump.action == "bump":
            return
        if bump.action == "splice":
            data.ignore_connection = True
        elif bump.action == "terminate":
            data.ignore_connection = True
            await self._deny_connection(client, server, req, aclrules.Decision("deny", bump.rule, bump.line))

    async def _tls_decision(self, client, server, sni):
        """The request a TLS ClientHello stands for, and the http_access decision on it
        (None when its CONNECT was already decided)."""
        connect = self.tunnels.get(client)
        if connect is not None:
            req = connect[0]
            req.sni = sni
            return req, None
        address = server.address or (sni or "", 0)
        # the name the connection is judged by: the SNI where it went to an address (transparent, a
        # SOCKS request naming an IP), but a SOCKS request naming a host goes there whatever the SNI says
        named = getattr(client.proxy_mode, "type_name", "") == "socks5" and not _is_ip(str(address[0]))
        req = self._tunnel_request(client, address, _user_of(client), name=None if named else sni)
        req.sni = sni
        await self._resolve(req)
        d = self.policy.check(req)
        if d.allowed:
            self.tunnels[client] = (req, {"action": d.action, "rule": d.rule, "policy": self.path_name},
                                    self.policy.matching(req, d.matched))
        return req, d

    # --- raw TCP ------------------------------------------------------------------------
    async def tcp_start(self, flow: tcp.TCPFlow) -> None:
        if self.policy is None or flow.metadata.get(meta.CODE) == "TCP_DENIED":
            return
        client = flow.client_conn
        user = meta.user(flow)
        if user:
            flow.metadata[meta.USER] = user
        if client in self.tunnels:   # the CONNECT (or the TLS ClientHello) already decided
            _, flow.metadata[meta.ACL], flow.metadata[meta.ACLS] = self.tunnels[client]
            flow.metadata[meta.ACL_NAMES] = self.policy.names
            return
        try:
            req = self._tunnel_request(client, flow.server_conn.address or ("", 0), user)
            await self._resolve(req)
            d = self.policy.check(req)
            self._mark(flow, req, d)
        except Exception as e:
            req, d = None, _failed(e)
            self._mark(flow, req, d)
        if not d.allowed:
            self.denied[client] = (d, req)
            _close(client, flow.server_conn)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        if flow.metadata.get(meta.CODE) == "TCP_DENIED":
            flow.messages[-1].content = b""   # flow.kill() does not stop raw TCP: send nothing

    def _mark(self, flow, req: aclrules.Request | None, d: aclrules.Decision) -> None:
        """The verdict in the flow's metadata, comment and mark (req None: deciding failed)."""
        flow.metadata[meta.ACL] = {"action": d.action, "rule": d.rule, "policy": self.path_name}
        flow.metadata[meta.ACLS] = self.policy.matching(req, d.matched) if req is not None else []
        flow.metadata[meta.ACL_NAMES] = self.policy.names
        word = "allowed" if d.allowed else "denied"
        meta.add_comment(flow, f"{word} by: {d.rule}")
        if not d.allowed:
            flow.metadata[meta.CODE] = "TCP_DENIED"
            flow.metadata[meta.LOCAL] = "acl"
            flow.metadata[meta.ERROR] = "ERR_ACCESS_DENIED"
            flow.marked = flow.marked or MARK

    async def _deny_connection(self, client, server, req, d, close_server: bool = True,
                               reply: bytes = b"") -> None:
        """A connection denied before it has a flow (ClientHello, server_connect): closed, after
        `reply` is sent to the client, and logged through a TCP flow of its own (tcp_start/tcp_end
        hooks, so the access log and mitmweb see it)."""
        self.denied[client] = (d, req)
        flow = tcp.TCPFlow(client, server, live=False)
        user = _user_of(client)
        if user:
            flow.metadata[meta.USER] = user
        self._mark(flow, req, d)
        _close(client, server if close_server else None, reply)
        log.info("%s: %s denied by %s", _ip(client.peername), req.url if req else _address(server), d.rule)
        await ctx.master.addons.handle_lifecycle(TcpStartHook(flow))
        await ctx.master.addons.handle_lifecycle(TcpEndHook(flow))


def _address(server) -> str:
    address = server.address or ("-", 0)
    return f"{address[0]}:{address[1]}"


def _user_of(client) -> str | None:
    """The user proxyauth recorded for a connection (SOCKS5 login, or an authenticated CONNECT)."""
    try:
        pa = ctx.master.addons.get("proxyauth")
        auth = pa.authenticated.get(client) if pa else None
    except Exception:
        auth = None
    return auth[0] if auth else None


# RFC 1928 6: reply 0x02 "connection not allowed by ruleset", with an empty IPv4 bound address
SOCKS5_NOT_ALLOWED = b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"


def _socks_refusal(client) -> bytes:
    """What tells a SOCKS5 client denied in server_connect why: with the eager strategy mitmproxy
    connects before it answers the client's request, so the answer is still due (mitmproxy's own,
    had the connection been left to it, would say "host unreachable"). Lazily, it has been sent."""
    eager = getattr(ctx.options, "connection_strategy", "eager") == "eager"
    return SOCKS5_NOT_ALLOWED if eager and getattr(client.proxy_mode, "type_name", "") == "socks5" else b""


def _close(client, server=None, reply: bytes = b"") -> None:
    """Really close connections from a hook: send `reply` to the client, close the sockets, then
    stop mitmproxy's readers.

    mitmproxy's own CloseConnection only cancels the reader task; when that
    task has not started yet (a connection refused in server_connect under
    the eager strategy), the socket is never closed and the client hangs.
    """
    try:
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
    except Exception:
        handler = None
    if handler is None:
        return
    for conn in (server, client):
        io = handler.transports.get(conn) if conn is not None else None
        if io is None:
            continue
        if io.writer is not None:
            try:
                if reply and conn is client:
                    io.writer.write(reply)  # closing still sends what was written
                io.writer.close()
            except Exception:  # already closed
                pass
        if io.handler is not None and io.handler is not asyncio.current_task():
            handler.close_connection(conn)


class InvalidHost(ValueError):
    """A Host header that names no host[:port], in a mode whose rules judge requests by it."""


def _failed(e: Exception) -> aclrules.Decision:
    """An error while deciding denies, as a firewall fails closed: left to mitmproxy, the error
    would be logged and the request or connection let through."""
    log.error("access control failed (%s: %s); denied", type(e).__name__, e, exc_info=(type(e), e, e.__traceback__))
    return aclrules.Decision(aclrules.DENY, "an error in access control")


def _ip(peer) -> str:
    ip = str(peer[0]) if peer else "-"
    return ip[7:] if ip.startswith("::ffff:") else ip


def _is_reverse(client) -> bool:
    return getattr(client.proxy_mode, "type_name", "") == "reverse"


_is_ip = aclrules._is_ip


addons = [AccessControl()]
