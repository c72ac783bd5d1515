"""Benchmark ceiling inside the suite: addons/all.py with the trivial answering addon where the cache sits.

It measures what a perfect cache hit would cost with every other Relais addon running
(access control before it, access log after it).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from addons import all as suite  # noqa: E402
from addons.cache import Cache  # noqa: E402
from ceiling_addon import Ceiling  # noqa: E402

addons = [suite.Suite(*(Ceiling() if isinstance(a, Cache) else a for a in suite.pipeline))]
suite.no_missing_hooks(globals())  # as all.py does
