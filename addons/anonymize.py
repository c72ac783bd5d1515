"""Anonymization: what the origin learns about the client, at the level the admin picks.

Squid's forwarded_for / via / request_header_access and Privoxy's hide-*
actions, driven by policies/anonymize.yaml (header lists and values; the
rules themselves are in anonrules.py).

    mitmdump -s addons/anonymize.py --set anonymize=paranoid

Levels (option `anonymize`), what each sends upstream with the shipped policy:
  transparent  Via: 1.1 <host> (relais) added; the client address appended to X-Forwarded-For.
  anonymous    Via added; no client address anywhere (X-Forwarded-For, Forwarded, X-Real-IP... and From removed).
  elite        nothing showing a proxy or the client: anonymous's removals plus Via, X-Forwarded-Host/-Proto...;
               a cross-site Referer is cut to its origin.
  paranoid     elite + a common User-Agent, a normalised Accept-Language, no cross-site Referer,
               and no cookies to or from the listed domains.
  auto         (default) elite for forward modes (regular, upstream, socks5, transparent...),
               transparent for reverse mode (a site's own backends want the client address).
Every level drops Proxy-Connection and Proxy-Authorization (meant for this proxy, never for the origin).
Per-acl overrides in the policy beat the option. Host, Authorization, Content-*, conditional and cache
headers are never touched. The edits happen in `requestheaders`, before the cache keys on the request.

Commands: anonymize.reload re-reads the policy (also done when its file changes);
a broken policy is reported and the last good one stays in force.
"""
from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

from mitmproxy import command, ctx, exceptions, http

try:
    from addons import anonrules, answered, meta, policyfile
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import anonrules, answered, meta, policyfile

ROOT = Path(__file__).resolve().parents[1]
ACLS = getattr(meta, "ACLS", "relais.acls")  # names of the acls that matched, written by the acl addon
MEMO_SIZE = 4096  # anonymized header sets remembered
LOOP = ((b"", b""),)  # in the memo: a request whose Via names this proxy (no real field list is this one)
logger = logging.getLogger(__name__)


def resolve_policy(value: str) -> Path:
    """A relative policy path is taken from the cwd if it exists there, else from the project root."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        return ROOT / path
    return path


def read_policy(path: Path) -> tuple[anonrules.Policy, tuple]:
    """The policy in `path` and its file stamp; PolicyError when unreadable or wrong."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise anonrules.PolicyError(str(path), None, f"cannot read: {getattr(e, 'strerror', None) or e}") from e
    return anonrules.load_policy(text, str(path)), (st.st_mtime_ns, st.st_size)


class Anonymize:
    def __init__(self) -> None:
        self.policy: anonrules.Policy | None = None
        self.watch = policyfile.Watch()     # the policy file, re-read when it changes
        self.hostname = socket.gethostname()
        self.ours = ""                      # the end of this proxy's Via entry (_new_policy)
        self.last_error: str | None = None  # why the last reload failed
        self.level = anonrules.AUTO         # the anonymize option
        self.strip_backend = False          # the anonymize_backend option
        self.memo: dict[tuple, tuple] = {}  # request facts -> the anonymized header fields
        self.poller = None                  # looks at the policy file while the proxy is idle
        self.acl_names = policyfile.AclNames(
            lambda: [(f"{self.path}:{o.line}: overrides: acl {o.acl}", o.acl) for o in self.policy.overrides],
            lambda msg: logger.warning("anonymize_policy: %s", msg))

    def load(self, loader):
        loader.add_option(
            "anonymize", str, anonrules.AUTO,
            "What the origin learns about the client. transparent: Via added and the client address "
            "appended to X-Forwarded-For (Squid's defaults). anonymous: Via added, no client address "
            "anywhere (X-Forwarded-For, Forwarded, X-Real-IP... and From removed). elite: no Via and no "
            "client address; a cross-site Referer is cut to its origin. paranoid: elite plus a common "
            "User-Agent, a normalised Accept-Language, no cross-site Referer, and no cookies for the "
            "policy's domains. auto: elite for forward modes, transparent for reverse mode. "
            "Per-acl overrides in anonymize_policy win over this option.",
            choices=[anonrules.AUTO, *anonrules.LEVELS],
        )
        loader.add_option(
            "anonymize_policy", str, "policies/anonymize.yaml",
            "The anonymization policy: header lists and values of each level, per-acl overrides and the "
            "backend headers anonymize_backend removes. A relative path not found in the working "
            "directory is taken from the Relais folder. Re-read when it changes (or anonymize.reload).",
        )
        loader.add_option(
            "anonymize_backend", bool, False,
            "Reverse mode: remove the response headers that identify the backend (the policy's "
            "reverse.strip_response: Server, X-Powered-By, X-AspNet-Version, Via...), like Squid's "
            "reply_header_access.",
        )

    def configure(self, updated):
        if "anonymize" in updated:
            try:
                anonrules.check_level_option(ctx.options.anonymize)
            except ValueError as e:
                raise exceptions.OptionsError(f"anonymize: {e}") from None
            self.level = ctx.options.anonymize
        if "anonymize_backend" in updated:
            self.strip_backend = ctx.options.anonymize_backend
        if "anonymize_policy" in updated:
            value = ctx.options.anonymize_policy.strip()
            if not value:
                raise exceptions.OptionsError("anonymize_policy: empty path")
            path = resolve_policy(value)
            try:
                self.policy, stamp = read_policy(path)
                self._new_policy()
            except anonrules.PolicyError as e:
                raise exceptions.OptionsError(f"anonymize_policy: {e}") from None
            self.watch = policyfile.Watch(path, stamp)

    def _new_policy(self) -> None:
        self.memo.clear()
        # the end of the Via entry this proxy adds: ` <visible_hostname> (<via_comment>)`, lower case
        self.ours = f" {self.policy.visible_hostname or self.hostname} ({self.policy.via_comment})".lower()
        self.acl_names.reset()  # its overrides are checked anew

    @property
    def path(self) -> Path | None:
        return self.watch.path

    @command.command("anonymize.reload")
    def reload(self) -> None:
        """Re-read the anonymization policy; if it is broken, keep the current one and say why."""
        if not self._reload():
            raise exceptions.CommandError(f"anonymize.reload: kept the previous policy: {self.last_error}")

    def _reload(self) -> bool:
        try:
            policy, stamp = read_policy(self.path)
        except anonrules.PolicyError as e:
            self.last_error = str(e)
            self.watch.refused()
            logger.error("anonymize: policy not reloaded, keeping the last good one: %s", e)
            return False
        self.policy, self.watch.stamp, self.last_error = policy, stamp, None
        self._new_policy()
        logger.info("anonymize: policy reloaded from %s", self.path)
        return True

    def _check_policy(self) -> None:
        if self.watch.changed():
            self._reload()

    def running(self) -> None:
        self.poller = policyfile.poll(self._check_policy)

    def done(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            self.poller = None

    # --- requests -------------------------------------------------------
    def level_for(self, flow: http.HTTPFlow) -> tuple[str, anonrules.Override | None]:
        if self.policy.overrides:
            self.acl_names.check(flow.metadata.get(meta.ACL_NAMES), flow.metadata.get(meta.ACL))
        return anonrules.choose_level(self.level, meta.mode_name(flow),
                                      flow.metadata.get(ACLS), self.policy)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or flow.is_replay == "request" or self.policy is None:
            return
        self._check_policy()  # (also polled while idle; a request may come first)
        level, override = self.level_for(flow)
        req = flow.request
        keep = ()
        if meta.mode_name(flow) == "upstream" and getattr(ctx.options, "upstream_auth", None):
            keep = ("proxy-authorization",)  # mitmproxy's upstream_auth put it there for the next proxy
        # plan_request is pure: the same headers from the same client for the same host get the same edits
        key = (level, req.headers.fields, meta.client_ip(flow), req.scheme, req.host,
               req.data.authority, req.http_version, keep)  # (HTTP/2's :authority is no header field)
        fields = self.memo.get(key)
        if fields is None:
            # (at a level that adds no Via this proxy cannot have been here before: another named alike was)
            looped = self.policy.levels[level].via == "on" and self._names_us(req.headers)
            if not looped:
                self._plan(req, self.policy.levels[level], meta.client_ip(flow), keep)
            if len(self.memo) >= MEMO_SIZE:
                self.memo.clear()
            self.memo[key] = LOOP if looped else req.headers.fields
        elif fields is LOOP:
            looped = True
        else:
            looped = False
            req.headers.fields = fields
        if looped:
            self._refuse_loop(flow)
            return
        flow.metadata[meta.ANONYMIZE] = level
        if override is not None:
            meta.add_comment(flow, f"anonymize: {level} (override for acl {override.acl})")

    def _names_us(self, headers: http.Headers) -> bool:
        """Does the request's Via already name this proxy (the pseudonym its Via adds)?"""
        ours = self.ours.encode()
        return any(k.lower() == b"via" and any((b" " + hop.strip().lower()).endswith(ours) for hop in v.split(b","))
                   for k, v in headers.fields)

    def _refuse_loop(self, flow: http.HTTPFlow) -> None:
        """Squid's answer to a forwarding loop (its own name in Via): 403 ERR_ACCESS_DENIED. Two proxies
        on one machine chained on purpose need each its own visible_hostname, as Squid's unique_hostname."""
        url = flow.request.pretty_url
        logger.warning("forwarding loop: %s came back through this proxy (its Via names it); denied", url)
        answered.refuse(flow, "ERR_ACCESS_DENIED", "anonymize", "forwarding loop (Via names this proxy)", url=url,
                        detail="forwarding loop: the request's Via names this proxy", code=None)

    def _plan(self, req: http.Request, rules: anonrules.LevelRules, client: str, keep: tuple[str, ...]) -> None:
        fields = list(req.headers.items(multi=True))
        # the host only matters to the Referer and cookie rules; pretty_host parses the Host header
        needs_host = rules.strip_cookies or (rules.referer != "keep" and any(k.lower() == "referer" for k, _ in fields))
        info = anonrules.RequestInfo(client=client, scheme=req.scheme,
                                     host=req.pretty_host if needs_host else req.host,
                                     http_version=req.http_version, keep=keep)
        edits = anonrules.plan_request(fields, rules, info,
                                       self.policy.visible_hostname or self.hostname, self.policy.via_comment)
        anonrules.apply(edits, req.headers)
        if edits and req.data.http_version in meta.LOWER_CASE_VERSIONS:  # names added (Via...) as HTTP/2 needs them
            req.headers.fields = tuple((k.lower(), v) for k, v in req.headers.fields)

    # --- responses ------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._strip_response(flow)
        self._via_on_response(flow)

    def _via_on_response(self, flow: http.HTTPFlow) -> None:
        """Where the level says `via: on`, the response the proxy forwards names it too (RFC 9110 7.6.3),
        as Squid's does. A cache hit is answered as this request's level says, whatever the level of
        the request that stored it: its stored Via entry of this proxy is dropped first."""
        resp, level = flow.response, flow.metadata.get(meta.ANONYMIZE)
        local = flow.metadata.get(meta.LOCAL)
        if resp is None or level is None or self.policy is None or (local and local != "cache"):
            return
        rules = self.policy.levels.get(level)
        add = rules is not None and rules.via == "on" and not (
            self.strip_backend and "via" in self.policy.strip_response and meta.mode_name(flow) == "reverse")
        if not add and not (local and any(k.lower() == b"via" for k, _ in resp.headers.fields)):
            return  # (the operator may hide Via from clients: anonymize_backend); a hit without Via: as stored
        hops = [h.strip() for v in resp.headers.get_all("via") for h in v.split(",") if h.strip()]
        if local:
            hops = [h for h in hops if not (" " + h.lower()).endswith(self.ours)]
        if add:
            hops.append(anonrules.via_value(resp.http_version, self.policy.visible_hostname or self.hostname,
                                            self.policy.via_comment))
        name = "via" if resp.data.http_version in meta.LOWER_CASE_VERSIONS else "Via"
        if hops:
            resp.headers[name] = ", ".join(hops)
        elif "via" in resp.headers:
            del resp.headers["via"]

    def response(self, flow: http.HTTPFlow) -> None:
        self._strip_response(flow)  # responses made by an addon skip responseheaders

    def _strip_response(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or self.policy is None:
            return
        local = flow.metadata.get(meta.LOCAL)
        if local and local != "cache":  # our own pages; a cache hit is a backend's response
            return
        level = flow.metadata.get(meta.ANONYMIZE)
        rules = self.policy.levels.get(level) if level else None
        strip = self.policy.strip_response if self.strip_backend and \
            meta.mode_name(flow) == "reverse" else ()
        if not strip and not (rules and rules.strip_cookies):
            return  # nothing this level does to responses
        edits = anonrules.plan_response(flow.response.headers.items(multi=True), flow.request.pretty_host,
                                        rules, strip)
        anonrules.apply(edits, flow.response.headers)


addons = [Anonymize()]
