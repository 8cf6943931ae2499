"""Fuzzing: fusion of random DAGs is exact, and folds exactly what can be folded.

Two generators from :mod:`repalgebra.testing`:

* :func:`~repalgebra.testing.mixed_graphs`: IR graphs made of linear regions
  with ReLU / GELU / opaque modules between them, skip connections across
  them (an ``add`` of a region's output and an earlier value) and fan-out
  (several regions reading one value), optionally ending in a classifier
  head.
* :func:`~repalgebra.testing.branchy_blocks`: ``nn.Module`` models of
  reparameterizable blocks written as users write them (conv-BN branches,
  1x1, asymmetric, dilated, 1x1 -> kxk, avg pool, BN and identity skips,
  summed; post BN, layer scale, residual, activation), fused through the
  torch front end.

How the tests know what must fold.  The generators decide it *by
construction* and record it:

* ``mixed_graphs`` builds each maximal linear region under its own source
  prefix (``r0``, ``r1``, ...) and records in a
  :class:`~repalgebra.testing.MixedRegion` whether it is foldable and the op
  counts fusion must leave in it.  Rules name a merged node after the common
  prefix of the nodes it replaces, so after fusion the test groups nodes by
  prefix and compares counts region by region: a foldable conv region must be
  exactly ``{"conv2d": 1}`` (a token region exactly one ``linear`` among its
  layout ops, a head ``mean`` + ``linear``), and a region that cannot fold
  exactly (a BN before a zero-padding conv, a biased 1x1 before a padded kxk,
  an avg pool with ``count_include_pad=False`` beside a conv, a pad with a
  non-zero value) must keep exactly the ops that make it unfoldable, with the
  refusal reason in the report.  The non-linear and opaque ops and the skip
  ``add`` s between regions must all stay.
* ``branchy_blocks`` counts as it builds: one ``nn.Conv2d`` per foldable
  block, one BN and one conv per :class:`~repalgebra.testing.PreNormConv`
  (a BN before a padded conv); the fused model must have exactly those
  modules, and :func:`~repalgebra.testing.assert_fuses_exactly` checks it
  equals the model in float64 to 1e-9 and that no BatchNorm is left in a
  foldable place.

Numbers of examples: ``5 x max_examples`` of the Hypothesis profile per test
(``tests/conftest.py``): ``ci`` 250 + 250 = 500 random graphs (about half a
minute single-threaded), ``nightly`` (``HYPOTHESIS_PROFILE=nightly``) 5,000 +
5,000 = 10,000.
"""

from __future__ import annotations

from hypothesis import given, settings
from torch import nn

from repalgebra import rewrite
from repalgebra.testing import (assert_fuses_exactly, assert_graphs_equal_through, assert_params_unchanged,
                                branchy_blocks, mixed_graphs, snapshot_params)

#: Examples per fuzz test: a multiple of the profile's ``max_examples`` (ci 50 -> 250, nightly 1000 -> 5000).
FUZZ_EXAMPLES = 5 * settings().max_examples


@settings(max_examples=FUZZ_EXAMPLES)
@given(ex=mixed_graphs())
def test_mixed_graphs_fold_region_by_region(ex):
    snap = snapshot_params(ex.graph)
    fused, report = rewrite(ex.graph)
    assert_params_unchanged(ex.graph, snap)

    got = ex.region_counts(fused)
    for r in ex.regions:
        assert got[r.prefix] == r.expected, (
            f"region {r.prefix} ({r.kind}{'' if r.foldable else ', not foldable'}: {r.desc}) "
            f"fused to {got[r.prefix]}, expected {r.expected}\n{report}\n{fused}"
        )
        if r.reason:
            reasons = [la.reason for la in report.left_alone if r.owns(la)]
            assert any(r.reason in s for s in reasons), f"region {r.prefix}: no left-alone reason {r.reason!r} in {reasons}\n{report}"
    assert ex.between_counts(fused) == ex.between, f"ops between regions changed\n{report}"
    assert_graphs_equal_through(ex.graph, fused, ex.x, ex.dtype, depth=ex.depth, what=repr(ex).split("\n%")[0])

    again, report2 = rewrite(fused)  # a fixpoint
    assert report2.fired == [] and str(again) == str(fused)


@settings(max_examples=FUZZ_EXAMPLES)
@given(ex=branchy_blocks())
def test_branchy_blocks_fuse_exactly(ex):
    fused = assert_fuses_exactly(ex.model, ex.x)
    modules = list(fused.modules())
    convs = sum(isinstance(m, nn.Conv2d) for m in modules)
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert (convs, bns) == (ex.convs, ex.batch_norms), f"{ex}\nconvs {convs}, BNs {bns}\n{fused.fuse_report}"
    left = [la for la in fused.fuse_report.left_alone if la.op == "batch_norm"]
    assert sorted(la.source.split(".")[0] for la in left) == sorted(ex.unfoldable), fused.fuse_report
    assert all("bn_before_conv: the conv after it zero-pads" in la.reason for la in left), fused.fuse_report
