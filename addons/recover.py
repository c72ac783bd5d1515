"""An addon may still answer a request whose origin failed before responding, from the `error` hook.

When mitmproxy's own connection to the origin fails (the errors addon trusts an origin
for connect_check_ttl after a successful check, and does not check it again), or when the
origin accepts the request and then closes or resets the connection before its response
(or sends one that cannot be parsed), or cuts its response short while mitmproxy buffers
it (none of it sent to the client yet: not streamed), mitmproxy calls the `error` hook
and then sends its own 502 page: a response an addon puts in the flow there is ignored.
Squid serves a stale copy in that case when stale-if-error allows it, or else its own
error page.

While `install()` is in effect (the cache and the errors addon call it at load), the
`error` hook of a flow that can still be answered carries
`flow.metadata["relais.recoverable"]`: the origin failed before any of its response
reached the client, the whole request was received, and the client is still there. It is
True when no response came (`flow.response` is None), and "cut" when the origin cut its
response short (`flow.response` is its head; an earlier addon's answer may replace it in
the hook, the value stays). An addon that then sets
`flow.response` and `flow.metadata["relais.recovered"] = True` has that response sent
instead of the 502: `flow.error` is cleared and the `response` hook follows (not
`responseheaders`), so the other addons see an answered flow after its `error` hook (the
access log logs it in `response`; mitmproxy's `save_stream_file` records the flow at
both). Anything else goes as mitmproxy does it. Not an addon: a helper the addons that
answer use.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    from addons import meta
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import meta

try:  # mitmproxy's internal HTTP layer: if it moves, nothing is changed and install() says so
    from mitmproxy.proxy.layers.http import HttpErrorHook, HttpStream, ResponseProtocolError
    PATCHABLE = all(callable(getattr(HttpStream, name, None))
                    for name in ("handle_protocol_error", "send_response", "state_errored",
                                 "state_consume_response_body"))
except ImportError:  # pragma: no cover - another mitmproxy
    PATCHABLE = False
try:  # newer mitmproxy (12.3.1) names the failure of a ResponseProtocolError; mitmproxy 11 takes a status
    from mitmproxy.proxy.layers.http import ErrorCode
    BAD_GATEWAY = ErrorCode.GENERIC_SERVER_ERROR
except ImportError:
    BAD_GATEWAY = 502

logger = logging.getLogger(__name__)
CUT = "cut"  # relais.recoverable of a flow whose response the origin cut short


class Patch:
    """A method of mitmproxy's HTTP layer replaced while any addon needs it: each install() needs its
    uninstall(), and the last uninstall() puts the original back. `original` is for the replacement
    to call. `cls` None: this mitmproxy's layer is not the one expected, and install() says so."""

    def __init__(self, cls, name: str, replacement, warning: str):
        self.cls, self.name, self.replacement, self.warning = cls, name, replacement, warning
        self.original = None
        self.users = 0

    def install(self) -> bool:
        """False (and the warning logged) when this mitmproxy's HTTP layer is not the one expected."""
        if self.cls is None:
            logger.warning(self.warning)
            return False
        self.users += 1
        if self.original is None:
            self.original = getattr(self.cls, self.name)
            setattr(self.cls, self.name, self.replacement)
        return True

    def uninstall(self) -> None:
        if self.users:
            self.users -= 1
        if not self.users and self.original is not None:
            setattr(self.cls, self.name, self.original)
            self.original = None


class Hold:
    """One addon's hold on a patch (its install and uninstall): taken at load, given back at done,
    each once, however often they are called."""

    def __init__(self, install, uninstall):
        self._install, self._uninstall, self.held = install, uninstall, False

    def take(self) -> None:
        if not self.held:
            self.held = self._install()

    def release(self) -> None:
        if self.held:
            self._uninstall()
            self.held = False


def install() -> bool:
    """Let addons answer from the `error` hook (see the module's text)."""
    return _PATCH.install()


def hold() -> Hold:
    """An addon's use of install()/uninstall(): `hold().take()` at load, `.release()` at done."""
    return Hold(install, uninstall)


def uninstall() -> None:
    _PATCH.uninstall()


def handle_protocol_error(self, event):
    """HttpStream.handle_protocol_error, unless an addon answered in the error hook it triggers."""
    # the origin failed before any of its response was sent on (none came, or the body mitmproxy was
    # buffering was cut short), and the whole request is in: the stream can still end well
    cut = self.flow.response is not None
    recoverable = (isinstance(event, ResponseProtocolError) and self.client_state == self.state_done
                   and (not cut or self.server_state == self.state_consume_response_body))
    steps = _PATCH.original(self, event)
    reply = None
    while True:
        try:
            command = steps.send(reply)
        except StopIteration:
            return
        if not (recoverable and isinstance(command, HttpErrorHook)):
            reply = yield command
            continue
        self.flow.metadata[meta.RECOVERABLE] = CUT if cut else True  # for this hook only
        try:
            reply = yield command
        finally:
            self.flow.metadata.pop(meta.RECOVERABLE, None)
        if self.flow.response is not None and self.flow.metadata.get(meta.RECOVERED):
            steps.close()  # no 502 page
            logger.debug("%s: answered after the origin failed (%s)", self.flow.request.url, event.message)
            self.flow.error = None
            yield from self.send_response()
            # events queued while the hook ran (the origin's close after its garbage) find a finished stream
            self.client_state = self.server_state = self.state_errored
            return


_PATCH = Patch(HttpStream if PATCHABLE else None, "handle_protocol_error", handle_protocol_error,
               "this mitmproxy's HTTP layer is not the one expected: an origin that fails before "
               "responding gets mitmproxy's own 502, never a stale copy or Squid's page")
