"""The whole Relais suite, in pipeline order.

    mitmdump -s addons/all.py
    mitmweb  -s addons/all.py

The addons run as one mitmproxy addon (addons/suite.py), which calls each hook on
them in list order, so the list is the pipeline (addons/README.md says why each
sits where it does):

1. acl        - access control, first so a denied request costs nothing
2. manager    - Squid's cache manager pages at the proxy's own address, once access control allowed them
3. hops       - removes hop-by-hop fields (named in Connection) both ways; answers TRACE/OPTIONS
                with Max-Forwards: 0
4. anonymize  - strips the client's identity before the cache keys on the request
5. cache      - RFC 9111 shared cache; answers hits before anything goes upstream
6. errors     - Squid-like answers when the origin is unreachable
7. dnscache   - no flow hook: resolves the names mitmproxy connects to, and keeps the answers
                (Squid's ipcache); the errors addon's origin check and dst acls use them too
8. interim    - no flow hook: makes mitmproxy relay an origin's 1xx interim responses
                instead of taking them as the final response
9. accesslog  - one Squid access.log line per transaction, last so it sees every verdict
"""
import sys
from pathlib import Path

# Load this checkout's addons, whether or not the project is installed.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from addons import accesslog, acl, anonymize, cache, dnscache, errors, hops, interim, manager  # noqa: E402
from addons.suite import Suite, no_missing_hooks  # noqa: E402

pipeline = [
    acl.AccessControl(),
    manager.Manager(),
    hops.Hops(),
    anonymize.Anonymize(),
    cache.Cache(),
    errors.Errors(),
    dnscache.DnsCache(),
    interim.Interim(),
    accesslog.AccessLog(),
]
addons = [Suite(*pipeline)]
no_missing_hooks(globals())
