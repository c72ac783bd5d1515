"""Benchmark baseline inside the suite: addons/all.py without the cache (access control,
anonymization, errors and the access log, relaying every request to the origin).

all.py on misses against it measures what the cache itself adds to a miss.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from addons import all as suite  # noqa: E402
from addons.cache import Cache  # noqa: E402

addons = [suite.Suite(*(a for a in suite.pipeline if not isinstance(a, Cache)))]
suite.no_missing_hooks(globals())  # as all.py does
