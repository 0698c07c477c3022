import os

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
