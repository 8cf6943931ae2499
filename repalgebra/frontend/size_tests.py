"""Python that reads sizes as Python values, taken as at the example and checked on every call.

Public code branches on sizes and reads them as numbers all the time: PointNet's ``B, D, N = x.size(); if D > 3:``,
the Stable Diffusion VAE's attention ``w_ * (int(c) ** -0.5)``, ``math.sqrt(x.shape[1])``.  ``torch.fx``
has no Python value to give and stops, and the model went to ``torch.export`` with *every* size fixed, though the
channel count ``D`` never changes.  While tracing, the front end knows each size at the example inputs
(:mod:`~repalgebra.frontend.ranks`): it takes the test or the number as there and records a call of
:func:`taken_as_traced` in the graph.  The builder makes each such call a check of the fused graph's inputs, run
before every call (as a model's own ``torch._assert``): an input whose sizes answer otherwise is refused by name,
never computed with the traced branch.  A test of the size of a value computed inside the model cannot be checked
on the inputs, and the capture is refused (the builder says so); where the test was taken in a plain function of the
model's code (mmseg's ``resize``), the model is traced again with that function carried as a call
(:func:`~repalgebra.frontend.torch.trace_model`).

Only reads that the meta tensors answer as the example does count (sizes and dtypes), and an input's device, read
on the example input (:meth:`~repalgebra.frontend.ranks.Ranks.answer`): a meta tensor's device, pointer or layout
is not the example's, and a branch taken on it was the wrong one (found by a review).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["taken_as_traced"]


def taken_as_traced(answer: Any, traced: Any, where: str, what: str) -> None:
    """Raise ``ValueError`` unless ``answer`` (the test or number at this call's sizes) is ``traced`` (at the
    example's): the fused graph holds the code of that answer only.  Under ``torch.jit.trace``, which records one
    call at its input's sizes (its sizes are tensors there, which TorchScript cannot compare with a number), it
    passes."""
    if torch.jit.is_tracing():
        return
    if answer != traced:
        raise ValueError(
            f"{where or 'the model'}: {what} gave {traced!r} at the example input, and the fused graph holds that branch "
            f"only; these inputs give {answer!r}: {_ADVICE['device' in what, 'made' in what]}"
        )


_ADVICE = {(False, False): "fuse again with an example of these sizes",
           (True, False): "call it with inputs on the example's device, or fuse again with an example there",
           (False, True): "call it with inputs made as the example was (x.detach().clone(): no gradients, a tensor of its "
                          "own), or fuse again with such an example"}
