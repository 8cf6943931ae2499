"""Normal form: every linear branchy region of one input folds to exactly one conv2d.

How the test knows the normal form: :func:`repalgebra.testing.linear_graphs`
only generates regions that are foldable *by construction* -- every branch is
an exact conv of the region's input onto one shared output grid (conv + BN +
layer scale, zero pad + conv, 1x1 -> kxk with the bias only before an
unpadded kxk, dense channel concats, avg pools counting their padding, BN and
identity where the grid is kept), joined by add/sub, with an optional trailing
scale or BN and outer residual.  The composition of such linear maps is itself
a single conv of the input (stride = the region's stride, kernel = the union
of the branch windows), so the expected result is exactly one ``conv2d`` node
and nothing else, computing the same function.  A region left with any other
op means a rule failed to fire where its preconditions hold.

Tolerances: :func:`repalgebra.testing.assert_graphs_equal` (elementwise,
relative to the magnitude graph: eps(dtype) + 1e-12 in a float64 run, 1e-5 for
float32 / 1e-12 for float64 in a run in the graph's dtype).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from repalgebra import rewrite
from repalgebra.testing import assert_graphs_equal, assert_params_unchanged, linear_graphs, snapshot_params


@given(ex=linear_graphs())
def test_linear_region_folds_to_one_conv(ex):
    snap = snapshot_params(ex.graph)
    fused, report = rewrite(ex.graph)
    assert_params_unchanged(ex.graph, snap)

    assert fused.op_counts() == {"conv2d": 1}, f"{ex.branches}\n{report}\n{fused}"
    assert report.left_alone == []
    conv = fused.nodes[0]
    assert conv.x is ex.graph.inputs[0] and fused.outputs == [conv.out]
    assert conv.out.shape == ex.graph.outputs[0].shape
    assert all(p.dtype == ex.dtype for p in conv.params.values())
    assert_graphs_equal(ex.graph, fused, ex.x, ex.dtype, what=str(ex.branches))

    # A normal form is a fixpoint: nothing fires on it again.
    again, report2 = rewrite(fused)
    assert report2.fired == [] and str(again) == str(fused)


@given(ex=linear_graphs(dtype=torch.float64, max_branches=6))
def test_wide_regions_fold_too(ex):
    """Up to six branches (float64, so the comparison is at 1e-12)."""
    fused, report = rewrite(ex.graph)
    assert fused.op_counts() == {"conv2d": 1}, f"{ex.branches}\n{report}"
    assert_graphs_equal(ex.graph, fused, ex.x, ex.dtype, what=str(ex.branches))
