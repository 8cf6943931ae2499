"""The torch back end: the module it builds from the fused graph computes what the original model computes.

Captured with ``torch.fx``, rewritten to the fused form, lowered by ``to_module`` and compared with the
*original module* (not the IR interpreter), without ``fuse``'s own check (which would fall back to
another capture, hiding a wrong lowering): float64 to 1e-9 relative, float32 to 1e-5.  The models
(:mod:`repalgebra.testing_layers`) leave asymmetric conv paddings after folding (even kernels with
``'same'``, ``ZeroPad2d`` before a conv), BN without affine, LN eps, pad values, pools that exclude
padding or use ``ceil_mode``, dilations and strides that differ between the axes.  Then ``fuse``
itself: it takes the ``torch.fx`` path for every one of them (a wrong lowering would make its check
fall back) and is exact.  The torch back-end mutants run this file.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given, settings

from repalgebra import fuse, rewrite, trace
from repalgebra.backend.torch import to_module
from repalgebra.testing_layers import ATTRIBUTE_CASES, LayerStack, assert_same_outputs, attribute_case, layer_stacks, rounding_small


def check_built(stack: LayerStack, dtype: torch.dtype) -> None:
    model, x = copy.deepcopy(stack.model).to(dtype), stack.x.to(dtype)
    graph, _ = rewrite(trace(model, x))
    built = to_module(graph)
    with torch.no_grad():
        for xi in (x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)):
            assert_same_outputs(model(xi), built(xi), dtype, f"module built from the fused graph of {stack} ({dtype})")


CASES = sorted(ATTRIBUTE_CASES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CASES)
def test_built_module_matches_the_model(name, dtype):
    check_built(attribute_case(name), dtype)


@given(stack=layer_stacks())
def test_built_module_of_layer_stacks(stack):
    check_built(stack, torch.float64)


@given(stack=layer_stacks())
@settings(max_examples=20)
def test_built_module_of_layer_stacks_float32(stack):
    # Where float32 rounding alone moves an output by more than the tolerance allows (a LayerNorm of two nearly
    # equal values), the original model in float32 is no reference: such draws are rejected, not compared
    # with a wider tolerance (as in the ONNX stage tests).
    assume(rounding_small(stack))
    check_built(stack, torch.float32)


@pytest.mark.parametrize("name", CASES)
def test_fuse_takes_the_fx_path_and_is_exact(name):
    stack = attribute_case(name)
    fused = fuse(stack.model, stack.x)
    assert [p.how for p in fused.fuse_report.parts] == ["fx"], fused.fuse_report
    with torch.no_grad():
        assert_same_outputs(stack.model(stack.x), fused(stack.x), torch.float64, f"fuse of {name}")
