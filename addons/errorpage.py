"""Squid-like error pages (ERR_ACCESS_DENIED, ERR_CONNECT_FAIL...).

Every addon that answers a request itself with an error uses this, so users
see one recognisable page, with Squid's X-Squid-Error header, whoever
refused the request.
"""
from __future__ import annotations

import html
import socket
import time
from http import HTTPStatus

from mitmproxy import http

# name -> (status, title, explanation); texts follow Squid's templates.
PAGES = {
    "ERR_ACCESS_DENIED": (403, "Access Denied.",
                          "Access control configuration prevents your request from being allowed at this time."),
    "ERR_CACHE_ACCESS_DENIED": (407, "Cache Access Denied.",
                                "Sorry, you are not currently allowed to request this URL until you have "
                                "authenticated yourself."),
    "ERR_CONNECT_FAIL": (503, "Connection to the server failed.",
                         "The system returned an error while connecting to the server."),
    "ERR_CANNOT_FORWARD": (503, "Unable to forward this request at this time.",
                           "This request could not be forwarded to the origin server or to any parent caches."),
    "ERR_DNS_FAIL": (503, "Unable to determine IP address from host name.",
                     "The DNS server returned an error for this host name."),
    "ERR_SECURE_CONNECT_FAIL": (503, "Failed to establish a secure connection to the server.",
                                "This proxy and the remote host failed to negotiate mutually acceptable security "
                                "settings for handling your request: the remote host may not support secure "
                                "connections, or the proxy is not satisfied with its security credentials."),
    "ERR_GATEWAY_FAILURE": (500, "Gateway Proxy Failure.",
                            "A non-recoverable internal failure or configuration problem prevents this request "
                            "from being completed."),
    "ERR_ZERO_SIZE_OBJECT": (502, "Zero Sized Reply.",
                             "The server closed the connection without sending any data for this request."),
    "ERR_READ_ERROR": (502, "Read Error.",
                       "The system returned an error while reading data from the network."),
    "ERR_INVALID_RESP": (502, "Invalid Response.",
                         "The HTTP Response message received from the contacted server could not be understood "
                         "or was otherwise malformed."),
    "ERR_READ_TIMEOUT": (504, "Read Timeout.",
                         "The system timed out while waiting for the server."),
    "ERR_ONLY_IF_CACHED_MISS": (504, "Valid document was not found in the cache and only-if-cached directive was specified.",
                                "You have issued a request with an only-if-cached cache control directive. "
                                "The document was not found in the cache."),
    "ERR_INVALID_URL": (400, "Invalid URL.",
                        "Some aspect of the requested URL is incorrect."),
    "ERR_INVALID_REQ": (400, "Invalid Request.",
                        "Some aspect of the HTTP request is invalid."),
    "ERR_UNSUP_HTTPVERSION": (505, "Unsupported HTTP version",
                              "This proxy does not accept the HTTP version you are attempting to use."),
    "ERR_TOO_BIG": (413, "The request or reply is too large.",
                    "The request is larger than this proxy accepts."),
    "ERR_APP_BLOCKED": (403, "Application Blocked.",
                        "This application is not allowed on this network."),
    "ERR_REQUEST_BLOCKED": (403, "Request Blocked.",
                            "The request was blocked by the application filter."),
}

HOSTNAME = socket.gethostname()


def make(name: str, url: str = "", detail: str = "", errno: int = 0,
         extra_headers: dict[str, str] | None = None, status: int | None = None) -> http.Response:
    """An error response for Squid error page `name`, about `url`.

    `detail` is shown on the page (for a denial: the rule that matched). `status` replaces the
    page's usual status code (with its reason phrase).
    """
    usual, title, explanation = PAGES[name]
    status = status or usual
    now = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ERROR: The requested URL could not be retrieved</title>
<style>body{{font-family:sans-serif;margin:2em}} #error{{color:#a00}} pre{{background:#eee;padding:.5em}}</style>
</head><body id="{name}">
<h1>ERROR</h1>
<h2>The requested URL could not be retrieved</h2>
<hr>
<p>The following error was encountered while trying to retrieve the URL: <a href="{html.escape(url)}">{html.escape(url)}</a></p>
<blockquote id="error"><p><b>{html.escape(title)}</b></p></blockquote>
<p>{html.escape(explanation)}</p>
{f"<pre>{html.escape(detail)}</pre>" if detail else ""}
<p>Your cache administrator can tell you more.</p>
<hr>
<div id="footer"><p>Generated {now} by {html.escape(HOSTNAME)} (relais)</p></div>
</body></html>
"""
    headers = {
        "Server": "relais",
        "Date": now,  # RFC 9110 6.6.1, as Squid sends it
        "Mime-Version": "1.0",
        "Content-Type": "text/html;charset=utf-8",
        "X-Squid-Error": f"{name} {errno}",
        "Cache-Control": "no-store",
        "Connection": "close" if status == 400 else "keep-alive",
    }
    headers.update(extra_headers or {})
    # a URL with bytes that are not UTF-8 (kept by mitmproxy as lone surrogates) is shown escaped
    resp = http.Response.make(status, body.encode("utf-8", "backslashreplace"), headers)
    if not resp.reason:  # a status mitmproxy has no phrase for (431)
        try:
            resp.reason = HTTPStatus(status).phrase
        except ValueError:
            pass
    return resp
