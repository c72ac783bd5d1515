"""The whole Relais suite, in pipeline order.

    mitmdump -s addons/all.py
    mitmweb  -s addons/all.py

mitmproxy calls each hook on the addons in list order, so the order is the
pipeline (see addons/README.md for why each sits where it does):

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

addons = [
    errors.Errors(),
    accesslog.AccessLog(),
]
