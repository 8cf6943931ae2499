"""Folding in float64 and casting once beats folding in the model's own dtype, for float16 and bfloat16 models.

The model is a RepVGG block (3x3 conv + BN, 1x1 conv + BN, BN skip) whose
parameters are stored in the low-precision dtype, with running variances
from 0.01 to 1 (BN scales up to 10, so folding multiplies and sums large
numbers).  The truth is that same model (the same low-precision parameter
values) evaluated in float64.  ``docs/precision.md`` shows the same numbers.

* Weights only (the fused graph run in float64): the float64 fold is one
  rounding of each exact fused parameter, within ``eps(dtype) x magnitude``
  (:func:`repalgebra.testing.assert_graphs_equal`), and its error is at
  least 1.5x below a fold done in the dtype itself, averaged over seeds.
* Run in the model's dtype (how the model is deployed): the float64 fold is
  still the more accurate one, on average.
"""

from __future__ import annotations

import pytest
import torch

from repalgebra import rewrite, run_graph
from repalgebra.builder import GraphBuilder
from repalgebra.testing import assert_graphs_equal

C = 16
SEEDS = range(8)


def repvgg_block(dtype: torch.dtype, seed: int):
    """3x3 conv + BN, 1x1 conv + BN, BN skip, summed; parameters stored in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    b = GraphBuilder()
    x = b.input("x", (1, C, 8, 8), dtype)

    def bn(y):
        var = 10 ** (-2 + 2 * torch.rand(C, generator=g, dtype=torch.float64))  # 0.01 to 1
        return b.batch_norm(y, mean=r(C).to(dtype), var=var.to(dtype), weight=r(C).to(dtype), bias=r(C).to(dtype))

    conv3 = b.conv2d(x, weight=(r(C, C, 3, 3) / (9 * C) ** 0.5).to(dtype), padding=(1, 1, 1, 1))
    conv1 = b.conv2d(x, weight=(r(C, C, 1, 1) / C**0.5).to(dtype))
    return b.build(b.add(b.add(bn(conv3), bn(conv1)), bn(x)))


def errors(dtype: torch.dtype) -> dict[str, float]:
    """Mean (over seeds) of max |y - truth| / max |truth| for each way of folding and running."""
    sums = dict.fromkeys(["f64_weights", "own_weights", "f64_run", "own_run", "unfused_run"], 0.0)
    for seed in SEEDS:
        graph = repvgg_block(dtype, seed)
        x = torch.randn(1, C, 8, 8, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
        truth = run_graph(graph, x)
        rel = lambda y: ((y.double() - truth).abs().max() / truth.abs().max()).item()  # noqa: E731
        f64, own = rewrite(graph)[0], rewrite(graph, fold_dtype=dtype)[0]
        assert_graphs_equal(graph, f64, x, torch.float64)  # one rounding of the fused parameters
        for key, y in (
            ("f64_weights", run_graph(f64, x)),
            ("own_weights", run_graph(own, x)),
            ("f64_run", run_graph(f64, x.to(dtype))),
            ("own_run", run_graph(own, x.to(dtype))),
            ("unfused_run", run_graph(graph, x.to(dtype))),
        ):
            sums[key] += rel(y) / len(SEEDS)
    return sums


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folding_in_float64_then_casting_is_more_accurate(dtype):
    e = errors(dtype)
    assert e["f64_weights"] * 1.5 < e["own_weights"], e
    assert e["f64_run"] < e["own_run"], e
    assert e["f64_run"] < e["unfused_run"], e  # the fused float16/bfloat16 model is even closer than the unfused one
