"""The errors addon in process: its origin check against real loopback sockets."""
import asyncio
import socket
import threading

from mitmproxy.test import taddons, tflow

from addons import errors
from harness import closed_port


class CountingListener:
    """A loopback port that accepts connections and counts them (each origin check is one)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()


def _flow(port: int):
    f = tflow.tflow()
    f.request.host, f.request.port = "127.0.0.1", port
    f.server_conn.timestamp_tcp_setup = None  # a new upstream connection: the case that is checked
    f.client_conn.proxy_mode = None
    return f


def _requests(addon, flows, leaving=()):
    """Run the request hook of every flow at once, as concurrent clients do; the `leaving` flows' clients
    go away (their hook is cancelled) while the check is in progress."""
    async def hook(flow):
        pending = addon.request(flow)  # None when nothing is to be checked
        if pending is not None:
            await pending

    async def main():
        with taddons.context(addon):
            waits = [asyncio.ensure_future(hook(f)) for f in flows]
            await asyncio.sleep(0)  # every hook has started, and waits for the check
            for i in leaving:
                waits[i].cancel()
            await asyncio.gather(*waits, return_exceptions=True)
    asyncio.run(main())


def test_requests_that_find_an_origin_unchecked_share_one_check():
    origin = CountingListener()
    try:
        addon = errors.Errors()
        flows = [_flow(origin.port) for _ in range(6)]
        # the first client leaves while the check is in progress: the others still get it
        _requests(addon, flows, leaving=(0,))
        assert origin.accepted == 1
        assert all(f.response is None for f in flows)  # the origin answers: they go upstream
        assert ("127.0.0.1", origin.port) in addon.reachable and not addon.checking
        _requests(addon, [_flow(origin.port)])  # trusted now: not checked again
        assert origin.accepted == 1
    finally:
        origin.close()


def test_a_failed_shared_check_answers_every_request_that_waited_for_it():
    addon = errors.Errors()
    with closed_port() as (port, _):
        flows = [_flow(port) for _ in range(4)]
        _requests(addon, flows)
    assert [f.response.status_code for f in flows] == [503] * 4
    assert all(f.response.headers["X-Squid-Error"].startswith("ERR_CONNECT_FAIL") for f in flows)
    assert not addon.reachable and not addon.checking


def _failed(port: int, message: str, recoverable, parent: str | None = None):
    """A flow at the error hook: its origin (or parent) failed with `message`, and recover.py marked it."""
    from mitmproxy import flow as mflow
    from mitmproxy.proxy.mode_specs import ProxyMode
    from addons import meta
    f = _flow(port)
    if parent:
        f.client_conn.proxy_mode = ProxyMode.parse(f"upstream:{parent}")
    f.error = mflow.Error(message)
    f.metadata[meta.RECOVERABLE] = recoverable
    return f


def test_a_connection_failure_the_cache_answered_still_marks_the_origin_and_the_parent_for_a_check():
    """The cache answers first with a stale copy (flow.response set, relais.recovered): the errors addon
    still forgets that the origin was reachable, and marks the parent suspect, so that the next request
    checks them; only a response the origin cut short (recover.CUT) says that it was reached."""
    from mitmproxy.test import tutils
    from addons import meta, recover
    addon = errors.Errors()
    with taddons.context(addon):
        for parent in (None, "http://127.0.0.1:3129"):
            addon.reachable[("127.0.0.1", 9)] = float("inf")
            f = _failed(9, "[Errno 111] Connect call failed ('127.0.0.1', 9)", True, parent)
            f.response, f.metadata[meta.RECOVERED] = tutils.tresp(), True  # the stale copy
            addon.error(f)
            assert f.response.status_code == 200 and meta.LOCAL not in f.metadata  # the copy stays
            if parent:
                assert ("127.0.0.1", 3129) in addon.suspect
            else:
                assert ("127.0.0.1", 9) not in addon.reachable
        addon.suspect.clear()
        addon.reachable[("127.0.0.1", 9)] = float("inf")
        for parent in (None, "http://127.0.0.1:3129"):
            f = _failed(9, "HTTP/1 protocol error: peer closed connection without sending complete message body",
                        recover.CUT, parent)
            f.response = tutils.tresp()  # the head of the response cut short
            addon.error(f)
            assert f.response.headers["X-Squid-Error"].startswith("ERR_READ_ERROR")
            assert ("127.0.0.1", 9) in addon.reachable and not addon.suspect  # it was reached
