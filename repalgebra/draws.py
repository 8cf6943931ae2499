"""The global random generators a model's forward may draw from, and runs that draw the same numbers.

A forward that draws (a VAE's ``mu + std * torch.randn_like(std)``, StyleGAN2's noise injection and its style
mixing crossover ``random.randint(1, n - 1)``, MC dropout ``F.dropout(x, training=True)``) is no one function of
its input.  Two things follow for ``fuse``:

- A capture cannot hold a draw that runs in Python while tracing: ``torch.fx`` runs ``random.randint`` once and
  records its number as a constant.  Comparing two calls finds that only by chance (one time in five where the
  draw has five outcomes); the generator's state does not: :func:`generator_states` before and after a call says
  *which* generators the call advanced, and :mod:`repalgebra.frontend.state` treats each as state the module
  that draws it changes, so that module runs as written.
- A check that compares the model with a candidate must let both draw the same numbers, or every module around a
  draw would "differ": each run of the checks is made within :func:`generators_kept`, so it starts where the
  generators are and leaves them there, and the model and the candidate draw alike.

Only the CPU generators are followed: a CUDA draw is compared as before (two draws differ, and the part around it
is kept whole).
"""

from __future__ import annotations

import contextlib
import random
import types
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["CHECK_SEED", "DRAWS", "generator_states", "generators_kept", "held_generator_state", "seeded_for_checks"]

TORCH, PYTHON, NUMPY = "torch's random generator", "Python's random module", "numpy's random module"
DRAWS = (TORCH, PYTHON, NUMPY)  # the names of the generators, as state names: no module attribute is called so


def generator_states() -> dict[str, Any]:
    """Each global CPU generator's state by name (values that compare equal where the generator did not draw)."""
    return {TORCH: held_generator_state(torch.default_generator), PYTHON: random.getstate(),
            NUMPY: _legacy_numpy(np.random.get_state())}


def held_generator_state(value: Any) -> Any:
    """The state of a generator a model holds as an attribute (``self.rng = random.Random(0)``,
    ``np.random.default_rng(0)``, a ``torch.Generator``), as a value that compares equal where it did not draw;
    None for anything else.  A call that draws from one changes it: state of the module that holds it, which then
    runs as written (a capture would hold one draw: a review found ``self.rng.randint`` frozen by fx)."""
    if isinstance(value, types.BuiltinMethodType) and value.__self__ is not None and not isinstance(value.__self__, types.ModuleType):
        return held_generator_state(value.__self__)  # (self.draw = rng.random)
    if isinstance(value, torch.Generator):
        return bytes(value.get_state().numpy())
    if isinstance(value, random.Random):
        return value.getstate()
    if isinstance(value, np.random.Generator):
        return repr(value.bit_generator.state)
    if isinstance(value, np.random.RandomState):
        return _legacy_numpy(value.get_state())
    return None


CHECK_SEED = 0x5EED_C0DE  # where the checks' runs start their generators: no seed a model writes (0, 42, 1234)


def seeded_for_checks() -> None:
    """Start the global CPU generators where every check run starts them (:data:`CHECK_SEED`), within a
    :func:`generators_kept` block.  A run from wherever fuse left them compared a model that seeds its own draws
    (``torch.manual_seed(0)`` in forward) with a capture that does not, after the trace had seeded them for real:
    both drew alike, and the fused model drew on (found by a review)."""
    torch.default_generator.manual_seed(CHECK_SEED)
    random.seed(CHECK_SEED)
    np.random.seed(CHECK_SEED)


def _legacy_numpy(state: tuple) -> tuple:
    """numpy's legacy generator state (its keys an array) as a value that compares whole."""
    kind, keys, pos, has_gauss, cached = state
    return kind, keys.tobytes(), pos, has_gauss, cached


@contextlib.contextmanager
def generators_kept() -> Iterator[dict[str, Any]]:
    """Within the block the global CPU generators may draw: after it, each is where it was.  It yields a dict that
    holds, once the block is done, where the block left them (:func:`generator_states`): two runs that compute
    the same must also leave them alike (a draw inside ``torch.random.fork_rng()`` puts the generator back; a
    capture of it draws on)."""
    torch_state, python_state, numpy_state = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    left: dict[str, Any] = {}
    try:
        yield left
    finally:
        left.update(generator_states())
        torch.random.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
