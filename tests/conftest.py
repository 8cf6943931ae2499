"""Shared test settings: Hypothesis profiles.

``ci`` (the default) never fails on a slow moment (``deadline=None``);
``nightly`` (``HYPOTHESIS_PROFILE=nightly``) runs many more examples.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("nightly", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
