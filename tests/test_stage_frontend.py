"""The front end alone: a captured graph, run by the IR interpreter, computes what the model computes.

No rewrite and no back end: ``trace`` (``torch.fx``, the module and function handlers) and
``capture_export`` (``torch.export``, the ATen handlers) on models whose layers reach every attribute
a handler reads (:mod:`repalgebra.testing_layers`: BN/LN eps, affine off, batch statistics, strides,
dilations, groups, asymmetric, ``'same'`` and even-kernel paddings, pad values, pool ``ceil_mode``,
``count_include_pad``, ``divisor_override``, and the channel axes of permute/flatten/transpose), in
float64 to 1e-9 relative.  The front-end mutants (``python -m repalgebra.mutants --rule frontend``)
run this file.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings

from repalgebra import run_graph, trace
from repalgebra.frontend.aten import capture_export
from repalgebra.testing_layers import ATTRIBUTE_CASES, LayerStack, assert_same_outputs, attribute_case, layer_stacks


def _reference(stack: LayerStack) -> torch.Tensor:
    with torch.no_grad():
        return stack.model(stack.x)


def expected_opaque(model: torch.nn.Module) -> int:
    """Layers the front end carries through whole: BatchNorms with batch statistics and pools with a divisor override.

    Every other layer must become its op: a handler that misreads an attribute may otherwise be saved by the
    builder's shape check (which makes a call whose op has the wrong output shape opaque) and go unseen.
    """
    return sum(
        (isinstance(m, torch.nn.BatchNorm2d) and not m.track_running_stats)
        or (isinstance(m, torch.nn.AvgPool2d) and m.divisor_override is not None)
        for m in model.modules()
    )


def check_graph(stack: LayerStack, graph, what: str) -> None:
    opaque = [n.source or n.out.name for n in graph.nodes if n.op == "opaque"]
    assert len(set(opaque)) == expected_opaque(stack.model), f"{what} of {stack}: carried through whole: {opaque}"
    assert_same_outputs(_reference(stack), run_graph(graph, stack.x), torch.float64, f"{what} of {stack}")


def check_fx(stack: LayerStack) -> None:
    check_graph(stack, trace(stack.model, stack.x), "fx capture")


def check_export(stack: LayerStack) -> None:
    check_graph(stack, capture_export(copy.deepcopy(stack.model).eval(), (stack.x,)).graph, "torch.export capture")


def check_functional(stack: LayerStack) -> None:
    """The same model written with ``F.*`` calls (the function handlers), captured by ``torch.fx``."""
    check_graph(stack, trace(Functional(stack.model), stack.x), "fx capture of F.* calls")


class Functional(torch.nn.Module):
    """A ``Sequential`` of the layers :mod:`repalgebra.testing_layers` draws, run with ``torch.nn.functional`` calls."""

    def __init__(self, seq: torch.nn.Sequential) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        from torch import nn

        from repalgebra.testing_layers import ChannelsLast, Tokens

        for m in self.seq:
            if isinstance(m, nn.Conv2d):
                x = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            elif isinstance(m, nn.Conv1d):
                x = F.conv1d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            elif isinstance(m, nn.Conv3d):
                x = F.conv3d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            elif isinstance(m, nn.ConvTranspose2d):
                x = F.conv_transpose2d(x, m.weight, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and m.track_running_stats:
                x = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            elif isinstance(m, nn.ConstantPad2d):  # nn.ZeroPad2d too
                x = F.pad(x, m.padding, value=m.value)
            elif isinstance(m, nn.AvgPool2d):
                x = F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
            elif isinstance(m, nn.MaxPool2d):
                x = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            elif isinstance(m, nn.GELU):
                x = F.gelu(x, approximate=m.approximate)
            elif isinstance(m, ChannelsLast):
                ln = m.norm
                x = F.layer_norm(x.permute(0, 2, 3, 1), ln.normalized_shape, ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
            elif isinstance(m, Tokens):
                ln = m.norm
                t = F.layer_norm(torch.transpose(torch.flatten(x, 2), 1, 2), ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                x = F.linear(t, m.proj.weight, m.proj.bias)
            elif isinstance(m, nn.LayerNorm):
                x = F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
            elif isinstance(m, nn.Flatten):
                x = torch.flatten(x, m.start_dim, m.end_dim)
            elif isinstance(m, nn.Linear):
                x = F.linear(x, m.weight, m.bias)
            else:
                x = m(x)
        return x


CASES = sorted(ATTRIBUTE_CASES)


@pytest.mark.parametrize("name", CASES)
def test_fx_capture_reads_every_attribute(name):
    check_fx(attribute_case(name))


@pytest.mark.parametrize("name", CASES)
def test_function_handlers_read_every_attribute(name):
    check_functional(attribute_case(name))


@pytest.mark.parametrize("name", CASES)
def test_export_capture_reads_every_attribute(name):
    check_export(attribute_case(name))


@given(stack=layer_stacks())
def test_fx_capture_of_layer_stacks(stack):
    check_fx(stack)


@given(stack=layer_stacks())
@settings(max_examples=25)
def test_function_handlers_on_layer_stacks(stack):
    check_functional(stack)


@given(stack=layer_stacks())
@settings(max_examples=6)
def test_export_capture_of_layer_stacks(stack):
    check_export(stack)
