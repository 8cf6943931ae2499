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
import torch.nn.functional as F
from hypothesis import assume, given, settings
from torch import nn

from repalgebra import fuse, rewrite, trace
from repalgebra.backend.torch import to_module
from repalgebra.frontend.calls import FnCall
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


class CarriedCalls(nn.Module):
    """Calls the IR carries through, their sizes read from the input as public model code reads them.

    ShiftViT's shift (slice assignments into ``zeros_like`` with ``C // 4`` channel groups), a strided slice, a
    ``view`` of a dense copy the IR takes for a transposed view, keyword arguments computed from ``x.size(dim=1)``, a call returning a tuple,
    and a learned table resized to the feature map (the one call kept as a module: it reads a constant tensor).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pos = nn.Parameter(torch.randn(1, 8, 3, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.bn(self.conv(x))
        B, C, H, W = x.shape
        g = C // 4
        out = torch.zeros_like(x)
        out[:, :g, :, :-1] = x[:, :g, :, 1:]
        out[:, g:, ::2] = x[:, g:, ::2]
        values, order = out.cumsum(dim=x.size(dim=1) // C).sort(dim=1)
        # (a one-tensor cat: a dense copy in the model, which the IR takes for the transposed view itself, so the
        # carried view must run as a reshape; a product divided: no reshape_dyn size)
        flat = torch.cat([out.transpose(2, 3)], 1).view(B, C * H // 2, -1)
        return flat, values, order, x + F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear")


def test_carried_calls_are_generated_code_reading_sizes_at_run_time():
    """The back end writes a carried call into the generated forward, its size arithmetic as nodes on the input's
    shape (no per-call module rebuilding arguments in Python); it runs at other batches and sizes than traced."""
    torch.manual_seed(0)
    model = CarriedCalls().double().eval()
    built = to_module(rewrite(trace(model, torch.randn(2, 3, 6, 5, dtype=torch.float64)))[0])
    assert [m.name for m in built.modules() if isinstance(m, FnCall)] == ["interpolate"]
    with torch.no_grad():
        for shape in [(2, 3, 6, 5), (3, 3, 9, 4), (1, 3, 4, 12)]:
            x = torch.randn(shape, dtype=torch.float64)
            assert_same_outputs(model(x), built(x), torch.float64, f"carried calls at {shape}")


class OneConvThreeCalls(nn.Module):
    """One conv (no bias) called five times: before a BN (which folds into that call: new weights and a bias), after
    a zero pad (absorbed into that call's padding: same weights), as it is on two inputs, and on ``x + 1`` (the
    constant folds into a bias: same weights, and a bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.bn(self.conv(x)), self.conv(F.pad(x, (1, 1, 1, 1))), self.conv(x), self.conv(x.relu()), self.conv(x + 1)


def test_calls_of_one_module_share_a_module_only_where_they_compute_the_same():
    """The back end builds one module for calls of one source with equal configuration and weights, and its own
    module for a call a rule changed (other weights, a bias, another padding)."""
    torch.manual_seed(0)
    model = OneConvThreeCalls().double().eval()
    model.bn.running_mean.normal_(0, 0.2), model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    graph, _ = rewrite(trace(model, x))
    assert sum(n.op == "pad" for n in graph.nodes) == 0, graph  # the pad is the conv's padding now
    built = to_module(graph)
    convs = [m for m in built.modules() if isinstance(m, nn.Conv2d)]
    assert sorted((m.padding, m.bias is not None) for m in convs) == [((0, 0), False), ((0, 0), True), ((0, 0), True), ((1, 1), False)]
    with torch.no_grad():
        assert_same_outputs(model(x), built(x), torch.float64, "one conv called five times")
