"""Benchmark proxy: addons/all.py with some of its addons left out, in one Suite as all.py has them.

RELAIS_BENCH_WITHOUT (environment): the class names of the addons left out, comma-separated.
"Cache" gives all.py without the cache; every name gives an empty suite. The benchmarks compare
all.py, or one addon alone, with these to say what an addon costs.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from addons import all as suite  # noqa: E402

WITHOUT = {n for n in os.environ.get("RELAIS_BENCH_WITHOUT", "").split(",") if n}
unknown = WITHOUT - {type(a).__name__ for a in suite.pipeline}
if unknown:  # mitmdump logs it as an error in the script
    raise ValueError(f"RELAIS_BENCH_WITHOUT: no such addon in all.py: {', '.join(sorted(unknown))}")
addons = [suite.Suite(*(a for a in suite.pipeline if type(a).__name__ not in WITHOUT))]
suite.no_missing_hooks(globals())  # as all.py does
