"""Benchmark baseline for access control: addons/all.py without the ACL addon (anonymization,
the cache, errors and the access log, as in all.py).

all.py against it measures what access control adds to a relayed request.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from addons import all as suite  # noqa: E402
from addons.acl import AccessControl  # noqa: E402

addons = [suite.Suite(*(a for a in suite.pipeline if not isinstance(a, AccessControl)))]
suite.no_missing_hooks(globals())  # as all.py does
