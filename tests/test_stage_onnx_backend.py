"""The ONNX back end: the exported model, run in onnxruntime, computes what the original model computes.

``export_onnx`` of float32 models whose layers reach every attribute a lowering writes
(:mod:`repalgebra.testing_layers`: Conv pads after folding an asymmetric or ``'same'`` padding,
strides, dilations and groups, BatchNormalization and LayerNormalization epsilon, Pad amounts and
value, AveragePool ``count_include_pad``/``ceil_mode``/pads, MaxPool dilations and ceil mode, Gelu
both ways, Gemm-free Linear, Transpose perms), at each opset the lowerings branch on (13, 17, 18,
20), compared in onnxruntime with the *original module* to 1e-5 relative (float32).  The ONNX
back-end mutants run this file.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repalgebra.backend.onnx import export_onnx
from repalgebra.backend.onnx_fallback import FallbackError
from repalgebra.testing_layers import ATTRIBUTE_CASES, LayerStack, assert_same_outputs, attribute_case, layer_stacks, onnx_outputs

OPSETS = (13, 17, 18, 20)


def _divisor_override(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.AvgPool2d) and m.divisor_override is not None for m in model.modules())


def check_export(stack: LayerStack, opset: int) -> None:
    model, x = stack.model.float(), stack.x.float()
    if _divisor_override(model):  # kept opaque: torch.onnx.export ignores the override, so the export may be refused
        try:
            proto = export_onnx(model, None, tuple(x.shape), opset=opset)
        except (FallbackError, onnx.shape_inference.InferenceError):  # refused, never a model that computes something else
            return
    else:
        proto = export_onnx(model, None, tuple(x.shape), opset=opset)
    with torch.no_grad():
        for xi in (x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1))):
            assert_same_outputs(model(xi), onnx_outputs(proto, xi), torch.float32, f"ONNX export (opset {opset}) of {stack}")


def _has_layer_norm(name: str) -> bool:
    return name.startswith("ln-")


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", sorted(ATTRIBUTE_CASES))
def test_export_matches_the_model(name, opset):
    if opset < 17 and _has_layer_norm(name):
        pytest.skip("LayerNormalization needs opset 17 (below, the fallback exports it: not our lowering)")
    check_export(attribute_case(name), opset)


@given(stack=layer_stacks(), opset=st.sampled_from([17, 18, 20]))
@settings(max_examples=40)
def test_export_of_layer_stacks(stack, opset):
    check_export(stack, opset)


@given(stack=layer_stacks(heads=False))
@settings(max_examples=15)
def test_export_of_layer_stacks_opset_13(stack):
    check_export(stack, 13)


def test_divisor_override_is_refused_not_exported_wrong():
    stack = attribute_case("avg-pool-divisor")
    with pytest.raises(FallbackError, match="computes something else"):
        export_onnx(stack.model.float(), None, tuple(stack.x.shape))


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


def test_max_pool_window_entirely_in_the_padding_is_refused_not_exported_wrong():
    """PyTorch gives -inf for a window whose taps all fall in the padding; onnxruntime does not: refused, by our
    lowering and by the fallback's check of torch.onnx.export's export (it was a wrong ONNX model before)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.MaxPool2d((1, 2), (1, 1), (0, 1), dilation=(1, 2)))
    with pytest.raises(FallbackError, match="computes something else"):
        export_onnx(model.eval(), None, (1, 1, 1, 1))
