import os
import tempfile

# Every Ray in the tests lives on this one machine: make Ray resolve node addresses to
# loopback (read when ray is imported, so set before any test module imports it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# gg.connect() reads the calibration in the data directory: in tests, never the user's.
os.environ["GRAPHGRAD_DATA_DIR"] = tempfile.mkdtemp(prefix="graphgrad-tests-")

from hypothesis import HealthCheck, settings

# CI profile: no deadline (shared, noisy machines), derandomized so a red run reproduces.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
