"""The ONNX back end: the exported model, run in onnxruntime, computes what the original model computes.

``export_onnx`` of float32 models whose layers reach every attribute a lowering writes
(:mod:`repalgebra.testing_layers`: Conv pads after folding an asymmetric or ``'same'`` padding,
strides, dilations and groups, BatchNormalization and LayerNormalization epsilon, Pad amounts and
value, AveragePool ``count_include_pad``/``ceil_mode``/pads, MaxPool dilations and ceil mode, Gelu
both ways, Gemm-free Linear, Transpose perms), at each opset the lowerings branch on (13, 17, 18,
20), compared in onnxruntime with the *original module* to 1e-5 relative (float32).  A max pool with a window
whose taps all fall in the padding (-inf in PyTorch, another value in onnxruntime) must be refused, and the
error must say so; whether a draw has one is asked of PyTorch, not of the lowering.  A random draw on which
float32 rounding alone moves a layer's output by more than a tenth of the tolerance is rejected, not compared with
a wider tolerance (:func:`repalgebra.testing_layers.rounding_small`).  The ONNX back-end mutants run this file.
"""

from __future__ import annotations


import onnx
import onnx.numpy_helper
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from repalgebra.backend.onnx import export_onnx
from repalgebra.backend.onnx_fallback import FallbackError
from repalgebra.testing_layers import (ATTRIBUTE_CASES, LayerStack, Tokens, assert_same_outputs, attribute_case, checked_inputs,
                                      layer_stacks, onnx_outputs, rounding_small)

OPSETS = (13, 17, 18, 20)


def _divisor_override_in_ceil_mode(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.AvgPool2d) and m.divisor_override is not None and m.ceil_mode for m in model.modules())


def _window_in_padding(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether a max pool of ``model`` run on ``x`` has a window that sees no input (all its taps in the padding),
    asked of PyTorch itself: each ``nn.MaxPool2d`` run on zeros of its input's shape gives -inf there."""
    found: list[bool] = []

    def hook(m: nn.MaxPool2d, inputs: tuple, output: torch.Tensor) -> None:
        zeros = torch.zeros_like(inputs[0])
        found.append(bool(torch.isneginf(F.max_pool2d(zeros, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)).any()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return any(found)


def check_export(stack: LayerStack, opset: int) -> None:
    model, x = stack.model.float(), stack.x.float()
    if _window_in_padding(model, x):  # -inf in PyTorch, another value in onnxruntime: refused, by our lowering and the fallback's check
        with pytest.raises(FallbackError, match="a window lies entirely in the padding"):
            export_onnx(model, None, tuple(x.shape), opset=opset)
        return
    if _divisor_override_in_ceil_mode(model):  # the last windows divide by less than kh * kw: refused
        with pytest.raises(FallbackError, match="divisor_override and ceil_mode"):
            export_onnx(model, None, tuple(x.shape), opset=opset)
        return
    proto = export_onnx(model, None, tuple(x.shape), opset=opset)
    with torch.no_grad():
        for xi in checked_inputs(x):
            assert_same_outputs(model(xi), onnx_outputs(proto, xi), torch.float32, f"ONNX export (opset {opset}) of {stack}")


def _has_layer_norm(name: str) -> bool:
    return name.startswith("ln-")


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", sorted(ATTRIBUTE_CASES))
def test_export_matches_the_model(name, opset):
    if opset < 17 and _has_layer_norm(name):
        pytest.skip("LayerNormalization needs opset 17 (below, the fallback exports it: not our lowering)")
    check_export(attribute_case(name), opset)


def _stack(make, shape: tuple[int, ...]) -> LayerStack:
    """A pinned :class:`LayerStack`: the layers ``make()`` returns (seeded, float64, eval mode) and a seeded input."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(*make()).double().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return LayerStack(model, x, "; ".join(repr(m) for m in model))


# Draws that once failed test_export_of_layer_stacks: a max pool with a window entirely in the padding (refused),
# and ceil-mode max pools whose dilated last window needs an end padding of the kernel size or more (onnxruntime
# takes less in MaxPool's pads; the fallback's ceil-mode MaxPool was refused by onnx's shape inference).
PINNED = {
    "window-in-padding": lambda: _stack(
        lambda: [nn.Conv2d(1, 1, 1, bias=False), nn.MaxPool2d((1, 2), (1, 1), (0, 1), dilation=(1, 2))], (1, 1, 1, 1)
    ),
    "window-in-padding-ceil": lambda: _stack(
        lambda: [nn.ZeroPad2d((1, 2, 2, 1)), nn.Conv2d(1, 1, 4, (1, 2), (0, 2), (1, 2)), nn.GELU(), nn.MaxPool2d(2, 2, 1, (1, 2), ceil_mode=True)],
        (3, 1, 2, 1),
    ),
    "dilated-ceil": lambda: _stack(lambda: [nn.Conv2d(1, 1, 1), nn.MaxPool2d(2, 2, 1, dilation=(1, 2), ceil_mode=True)], (3, 1, 1, 2)),
    "constant-pad-dilated-ceil": lambda: _stack(
        lambda: [nn.Conv2d(1, 2, 1), nn.ReLU(), nn.ConstantPad2d((1, 0, 0, 0), 0.25), nn.MaxPool2d((2, 1), 2, (1, 0), dilation=2, ceil_mode=True)],
        (2, 1, 4, 3),
    ),
}


@given(stack=layer_stacks(), opset=st.sampled_from([17, 18, 20]))
@settings(max_examples=40)
@example(stack=PINNED["window-in-padding"](), opset=17)
@example(stack=PINNED["window-in-padding-ceil"](), opset=20)
@example(stack=PINNED["dilated-ceil"](), opset=20)
@example(stack=PINNED["constant-pad-dilated-ceil"](), opset=18)
def test_export_of_layer_stacks(stack, opset):
    assume(rounding_small(stack))
    check_export(stack, opset)


@given(stack=layer_stacks(heads=False))
@settings(max_examples=15)
def test_export_of_layer_stacks_opset_13(stack):
    assume(rounding_small(stack))
    check_export(stack, 13)


def test_pinned_draws_are_not_rejected():
    """An explicit example that ``assume`` rejects is skipped silently: the pinned draws must pass the rounding filter."""
    for name, make in PINNED.items():
        assert rounding_small(make()), name


@pytest.mark.parametrize(
    "make",
    [
        lambda: [nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2, eps=1e-6, affine=False), nn.GELU()],  # GELU tail
        lambda: [nn.Conv2d(1, 2, 1, bias=False), Tokens(nn.LayerNorm(2, eps=1e-3, elementwise_affine=False), nn.Linear(2, 1, bias=False))],
    ],
)
def test_rounding_filter_rejects_draws_whose_float32_output_rounding_alone_moves(make):
    """The shapes of draws that failed test_export_of_layer_stacks with a right export: two channels a GELU takes into
    its tail, and a LayerNorm of two channels (outputs +-a) into a Linear whose two weights nearly cancel.  Float32
    rounding alone moves such outputs by more than 1e-6 of their largest value; the filter rejects them."""
    gen = torch.Generator().manual_seed(0)
    layers = make()
    with torch.no_grad():
        layers[0].weight.copy_(torch.tensor([2.5, 3.0]).view(2, 1, 1, 1))
        if isinstance(layers[-1], Tokens):
            layers[-1].proj.weight.copy_(torch.tensor([[0.5, 0.5 + 1e-3]]))
    stack = LayerStack(nn.Sequential(*layers).double().eval(), -1 - torch.rand(1, 1, 3, 3, generator=gen, dtype=torch.float64), "")
    assert not rounding_small(stack)


def test_divisor_override_is_exported_as_pytorch_computes_it():
    """torch.onnx.export writes divisor_override as a plain average; the fallback rewrites the pool first."""
    stack = attribute_case("avg-pool-divisor")
    check_export(stack, OPSETS[-1])


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("kernel, stride, padding, size", [((2, 3), (2, 2), (1, 1), (9, 8)), ((3, 3), (2, 2), (1, 1), (8, 8)), ((2, 2), (3, 2), (1, 1), (7, 5))])
def test_average_pool_in_ceil_mode_that_drops_a_window(kernel, stride, padding, size, count_include_pad):
    """Regression: PyTorch's ceil mode drops a last window that would start in the end padding; onnx's shape inference
    did not, so ``onnx.checker`` refused the export (the declared output was one row shorter than the inferred one)."""
    from repalgebra.backend.onnx import graph_to_onnx
    from repalgebra.builder import GraphBuilder

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.avg_pool2d(x, kernel, stride, padding, ceil_mode=True, count_include_pad=count_include_pad)
    b = GraphBuilder()
    v = b.input("x", x.shape)
    graph = b.build(b.avg_pool2d(v, kernel=kernel, stride=stride, padding=padding, ceil_mode=True, count_include_pad=count_include_pad))
    for opset in OPSETS:
        proto = graph_to_onnx(graph, opset=opset)
        onnx.checker.check_model(proto, full_check=True)
        assert_same_outputs(ref, onnx_outputs(proto, x), torch.float32, f"AveragePool at opset {opset}")


@pytest.mark.parametrize("case", ["window-in-padding", "window-in-padding-ceil"])
def test_max_pool_window_entirely_in_the_padding_is_refused_not_exported_wrong(case):
    """PyTorch gives -inf for a window whose taps all fall in the padding; onnxruntime does not: refused, by our
    lowering and by the fallback's check of torch.onnx.export's export (it was a wrong ONNX model before), and the
    error says why."""
    stack = PINNED[case]()
    assert _window_in_padding(stack.model, stack.x)
    why = r"computes something else: .*our lowering refused: max_pool2d at \S+: a window lies entirely in the padding"
    with pytest.raises(FallbackError, match=why):
        export_onnx(stack.model.float(), None, tuple(stack.x.shape))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", ["dilated-ceil", "constant-pad-dilated-ceil"])
def test_max_pool_in_ceil_mode_whose_end_padding_reaches_the_kernel_size(case, opset):
    """Regression: a dilated ceil-mode max pool whose last window needs an end padding of the kernel size or more
    (onnxruntime refuses MaxPool pads that large) was refused by our lowering; torch.onnx.export's MaxPool with
    ``ceil_mode=1`` then computes PyTorch's size in onnxruntime, but onnx's shape inference keeps a last window
    that starts in the end padding, so ``onnx.checker`` refused the model.  Now our lowering pads with -inf."""
    stack = PINNED[case]()
    assert not _window_in_padding(stack.model, stack.x)
    proto, report = export_onnx(stack.model.float(), None, tuple(stack.x.shape), opset=opset, return_report=True)
    assert report.path == "own lowering", report
    pool = next(n for n in proto.graph.node if n.op_type == "MaxPool")
    pad = next(n for n in proto.graph.node if pool.input[0] in n.output)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert pad.op_type == "Pad" and values[pad.input[2]] == -float("inf"), "the pool's padding is not an explicit Pad of -inf"
    check_export(stack, opset)
