"""Shared test settings: Hypothesis profiles.

``ci`` (the default) never fails on a slow moment (``deadline=None``);
``nightly`` (``HYPOTHESIS_PROFILE=nightly``) runs 20x more examples.  The fuzz
tests (``tests/test_fuzz.py``) scale their example counts from the profile's
``max_examples``: 5x per test, two tests, so ``ci`` fuzzes 500 random graphs
and ``nightly`` 10,000.

``mutants`` is what ``python -m repalgebra.mutants`` runs each mutant's tests
with: the ``ci`` numbers, derandomized (the same examples on every run, so a
mutant's verdict is reproducible), no example database (a failure found for a
mutant must not be replayed against the real code, nor the other way round)
and no shrinking (a mutant is killed by the first failure; its minimal form
is not needed).  ``mutants-random`` is the same with new examples on every run.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

settings.register_profile("ci", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("nightly", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "mutants",
    settings.get_profile("ci"),
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    print_blob=False,
)
# The same, drawing new examples on every run (``python -m repalgebra.mutants --profile mutants-random``).
settings.register_profile("mutants-random", settings.get_profile("mutants"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _single_thread():
    """One torch thread per test: the tensors are small, and a 2-thread pool on a
    loaded 2-core machine makes each small conv ~30x slower (thread hand-off, not arithmetic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
