"""The whole Relais suite, in pipeline order.

    mitmdump -s addons/all.py
    mitmweb  -s addons/all.py

mitmproxy calls each hook on the addons in list order, so the order is the
pipeline (see addons/README.md for why each sits where it does):

0. acl        - access control (policy option), first so a denied request costs nothing
0b. anonymize - strips the client's identity (anonymize option, policies/anonymize.yaml)
                before the cache keys on the request
0c. cache     - RFC 9111 shared cache (RAM + disk, negative caching); after acl/anonymize,
                before errors so hits never contact the origin
1. errors     - Squid-like answers when the origin is unreachable
2. accesslog  - one Squid access.log line per transaction, last so it sees
                every other addon's verdict
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import addons as _pkg  # noqa: F401
    from addons import accesslog, errors
except ImportError:  # run by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import accesslog, errors
from addons import acl  # noqa: E402  (sys.path is set above)
from addons import anonymize  # noqa: E402  (sys.path is set above)
from addons import cache  # noqa: E402  (sys.path is set above)

addons = [
    acl.AccessControl(),  # first: access control decides before any work is done
    anonymize.Anonymize(),  # after acl, before cache: rewrites what is sent upstream (and keyed on)
    cache.Cache(),  # after acl/anonymize, before errors
    errors.Errors(),
    accesslog.AccessLog(),
]
