"""Benchmark ceiling: answers every request in requestheaders with a constant response."""
from mitmproxy import http

BODY = b"x" * 1000


class Ceiling:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(200, BODY, {"Content-Type": "application/octet-stream"})


addons = [Ceiling()]
