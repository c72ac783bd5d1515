"""addons/all.py with a member that fails on requests whose path contains "/break-", placed where
the hop-by-hop addon sits (after access control, before anonymization and the cache): how the suite
treats an addon's error on a live proxy (tests/test_suite.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from addons import all as suite  # noqa: E402


class Broken:
    def requestheaders(self, flow):
        if "/break-" in flow.request.path:
            raise ValueError("a bug in some addon")


members = list(suite.pipeline)
members.insert(next(i for i, a in enumerate(members) if type(a).__name__ == "Hops"), Broken())
addons = [suite.Suite(*members)]
suite.no_missing_hooks(globals())
