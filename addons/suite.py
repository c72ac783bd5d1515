"""Several Relais addons run as one mitmproxy addon, in order (how addons/all.py composes the suite).

mitmproxy calls every hook on every addon it knows, through a few layers of generic
dispatch per addon and per event, eight events per request. With the suite's addons
registered one by one, that dispatch alone cost about as much as answering a cache hit.
Suite is one addon: for each hook, it calls the members that define it, in order, with
the rules mitmproxy applies to the addons of one script:

- a hook that returns an awaitable is awaited before the next member's hook runs;
- an exception in one member's hook is logged as mitmproxy logs it ("Addon error: ...")
  and the later members' hooks still run, as if each member were loaded by itself (within
  one script mitmproxy would skip them: a request would then go upstream without being
  anonymized, and would not be logged). A request whose judging failed is not forwarded
  though: in `requestheaders`, `request` or `http_connect` it is answered with Squid's
  500 ERR_GATEWAY_FAILURE page (fail closed; the later members see an answered request),
  and a raw stream whose hook failed is killed. AddonHalt and OptionsError go up, as in
  mitmproxy;
- lifecycle hooks (load, configure, running, done) must not be coroutines, since
  mitmproxy may call them synchronously.

A member may map events to methods in `first_hooks` ({"requestheaders": "note", ...}):
those methods run before every member's hook for that event, whatever the member's
place in the list; its own hook for the event still runs in its place, unless it is
that same method, which then runs once, first. They are for observers that only take
note (the access log noting that a client sent a request, before access control awaits
a DNS lookup that the client may not wait for). They must not be coroutines (an
awaitable one returns is an error); an error in one is logged and skips nothing, but
AddonHalt and OptionsError go up as from any hook.

The members keep their options (each one's `load` declares them), their commands, and
their `configure`, `running` and `done` hooks. Each member stays loadable alone
(`mitmdump -s addons/cache.py`). mitmproxy's table of addon names lists them too, so
`ctx.master.addons.get("cache")` finds the cache, and loading one a second time
(`-s addons/all.py -s addons/cache.py`) is refused as before.

If mitmproxy loads the suite but never applies its options (it does so, silently, when
one option is given twice), Suite logs an error and stops the proxy: without its
options no Relais hook would ever run, and the proxy would be open to anyone.
"""
from __future__ import annotations

import asyncio
import inspect
import logging

from mitmproxy import ctx, exceptions, hooks, http
# Importing these registers every hook mitmproxy can call in hooks.all_hooks.
import mitmproxy.addonmanager  # noqa: F401  (load)
import mitmproxy.proxy.layers  # noqa: F401  (http, tcp, udp, tls, dns, websocket, quic)
import mitmproxy.proxy.server_hooks  # noqa: F401  (client/server connection events)

try:
    from addons import answered
except ImportError:  # loaded by path without the project installed
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import answered

logger = logging.getLogger("mitmproxy.addonmanager")  # where mitmproxy logs addon errors
PASS_UP = (exceptions.AddonHalt, exceptions.OptionsError)
LIFECYCLE = ("load", "configure", "running", "done")
OWN = ("load", "configure", "done")  # Suite's own methods, which call the members' hooks
WARNED = frozenset({"add_log"})  # mitmproxy warns of a deprecated hook when a script has the name at all
REQUEST_EVENTS = frozenset({"requestheaders", "request", "http_connect"})  # an error there: answered 500
STREAM_EVENTS = frozenset({"tcp_start", "tcp_message", "udp_start", "udp_message"})  # an error there: killed


class Suite:
    name = "suite"

    def __init__(self, *members):
        self.members = list(members)
        self.configured = False
        self._load_members = self._configure_members = self._done_members = None
        for m in self.members:
            for event in LIFECYCLE:
                if inspect.iscoroutinefunction(getattr(m, event, None)):
                    raise TypeError(f"{type(m).__name__}.{event} is a coroutine; mitmproxy may call it synchronously")
            for event, name in getattr(m, "first_hooks", {}).items():
                if inspect.iscoroutinefunction(getattr(m, name)) or event in LIFECYCLE:
                    raise TypeError(f"{type(m).__name__}.{name}: a first hook must be a plain function of a flow event")
        for event in hooks.all_hooks:
            first = [getattr(m, name) for m in self.members if (name := getattr(m, "first_hooks", {}).get(event))]
            calls = [f for m in self.members if callable(f := getattr(m, event, None)) and f not in first]
            if first or calls:
                setattr(self, f"_{event}_members" if event in OWN else event, _dispatcher(event, calls, first))
        for m in self.members:  # mitmproxy finds commands among an addon's attributes
            for attr in dir(type(m)):
                if isinstance(getattr(getattr(type(m), attr), "command_name", None), str):
                    setattr(self, f"{type(m).__name__}_{attr}", getattr(m, attr))

    def load(self, loader):
        self._names(add=True)
        if self._load_members:
            self._load_members(loader)
        try:
            asyncio.get_running_loop().call_soon(self._check_configured)
        except RuntimeError:  # no event loop: in-process use, where the caller configures
            pass

    def configure(self, updated):
        self.configured = True
        if self._configure_members:
            try:
                self._configure_members(updated)
            except exceptions.OptionsError as e:
                # mitmproxy prints a script's error with its traceback: the message is what the user needs
                raise exceptions.OptionsError(str(e)) from None

    def done(self):
        if self._done_members:
            self._done_members()
        self._names(add=False)

    def _names(self, add: bool) -> None:
        """The members' names in mitmproxy's table of addons, as if each were loaded by itself."""
        table = getattr(getattr(ctx.master, "addons", None), "lookup", None) if hasattr(ctx, "master") else None
        if not isinstance(table, dict):
            return
        named = {getattr(m, "name", type(m).__name__.lower()): m for m in self.members}  # mitmproxy's naming
        if not add:
            for name, m in named.items():
                if table.get(name) is m:
                    del table[name]
            return
        for name, m in named.items():
            if table.get(name, m) is not m:
                raise exceptions.AddonManagerError(f"An addon called '{name}' already exists.")
        table.update(named)

    def _check_configured(self) -> None:
        """mitmproxy 11 loads a script whose options it cannot apply (one given twice: --set
        cache_dir=a --set cache_dir=b, or a value it cannot read: --set cache_dir_size=1GB) without
        a word and without calling any of its hooks: the proxy would run without access control.
        Stop it instead, saying which."""
        if not self.configured:
            why = "; ".join(_unapplied()) or "is an option given twice, as in --set cache_dir=a --set cache_dir=b?"
            logger.error(f"Relais stopped: mitmproxy loaded the suite but never applied its options ({why}); "
                         "it will not run as a proxy without access control.")
            asyncio.get_running_loop().call_later(1, ctx.master.shutdown)  # if mitmproxy has not exited on the error

    def __repr__(self) -> str:
        return f"Suite({', '.join(type(m).__name__ for m in self.members)})"


def _unapplied() -> list[str]:
    """Why mitmproxy could not apply the --set values it kept for the suite's options, read as it
    reads them (its private API: nothing where that differs)."""
    try:
        opts, out = ctx.options, []
        for name, value in opts.deferred.items():
            if (option := opts._options.get(name)) is not None:
                try:
                    opts._parse_setval(option, getattr(value, "val", value))
                except exceptions.OptionsError as e:
                    out.append(f"--set {name}: {e}")
        return out
    except Exception:
        return []


def no_missing_hooks(namespace: dict) -> None:
    """Name every mitmproxy hook in a script module's namespace (None where it defines none).

    mitmproxy looks each event up on the script's module as well as on its addons, eight
    times a request or more, and a module that lacks the name raises and drops an
    AttributeError each time (about 0.7 us; 2 % of the proxy's throughput). mitmproxy
    skips a hook that is None.
    """
    for event in hooks.all_hooks:
        if event not in WARNED:
            namespace.setdefault(event, None)


def _failed(exc: Exception, event: str = "", args: tuple = ()) -> None:
    logger.error(f"Addon error: {exc}", exc_info=(type(exc), exc, exc.__traceback__.tb_next))
    if args:
        _fail_closed(event, args[0], exc)


def _fail_closed(event: str, flow, exc: Exception) -> None:
    """A request or stream some member failed to handle does not go on as if it had been judged."""
    if event in REQUEST_EVENTS and isinstance(flow, http.HTTPFlow) and flow.response is None:
        # at requestheaders, as any answer made there, the body is neither invited nor kept
        answered.refuse(flow, "ERR_GATEWAY_FAILURE", "suite", f"{type(exc).__name__} in a Relais addon ({exc})",
                        detail="an internal error of the proxy; its log says which",
                        body_too=event == "requestheaders")
    elif event in STREAM_EVENTS and getattr(flow, "killable", False):
        flow.kill()


def _dispatcher(event: str, calls: list, first: list):
    if first:
        rest = _dispatcher(event, calls, [])

        def dispatch_first(*args):
            for fn in first:
                try:
                    if inspect.isawaitable(res := fn(*args)):
                        getattr(res, "close", lambda: None)()  # never awaited: no "never awaited" warning
                        raise TypeError(f"first hook {fn.__qualname__} returned an awaitable")
                except PASS_UP:
                    raise
                except Exception as e:  # an observer's error skips nothing
                    _failed(e)
            return rest(*args)
        return dispatch_first

    def dispatch(*args):
        for i, fn in enumerate(calls):
            try:
                res = fn(*args)
            except PASS_UP:
                raise
            except Exception as e:  # the later members still run, as addons loaded one by one
                _failed(e, event, args)
                continue
            if res is not None and inspect.isawaitable(res):
                # the rest waits for this one, as mitmproxy awaits each addon in turn
                return _finish(res, calls[i + 1:], args, event)
        return None
    return dispatch


async def _finish(pending, rest: list, args, event: str) -> None:
    for fn in (None, *rest):
        try:
            res = pending if fn is None else fn(*args)
            if res is not None and inspect.isawaitable(res):
                await res
        except PASS_UP:
            raise
        except Exception as e:
            _failed(e, event, args)
