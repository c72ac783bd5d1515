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
