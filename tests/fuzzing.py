"""What every fuzz test shares: Hypothesis settings and the two case counts' gate.

The default run fuzzes each target a few thousand times with a fixed seed;
the full count (>= 10,000 per target) is marked `fuzz` and runs with
`pytest -m fuzz` (`make fuzz`; `.ci/run` runs it when the suite leaves room).
`conftest.py` skips `fuzz`-marked tests unless `-m` names the marker.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

FUZZ_SETTINGS = settings(
    derandomize=True,  # a fixed seed: the same inputs on every run, a failure reproduces
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
