"""Mutation testing (``python -m repalgebra.mutants``): every seeded bug in every rule is caught by the tests.

The fast tests here check the mutants themselves: every rule in
``repalgebra.RULES`` has at least three, each applies (its snippet occurs
once in the source it mutates), changes the code, changes what the rule
computes, and is always undone.  One end-to-end run of the machinery (a
worker process, the unmutated baseline, one mutant) runs too.

The full run (all mutants, about 75 seconds on two cores) is
``test_every_mutant_is_killed``; it runs when ``REPALGEBRA_MUTANTS=1`` is set
(CI: ``REPALGEBRA_MUTANTS=1 python -m pytest tests/test_mutants.py -q``).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import repalgebra
from repalgebra import RULES, rewrite, run_graph
from repalgebra import mutants as M
from repalgebra.builder import GraphBuilder

ROOT = Path(__file__).resolve().parents[1]


def test_every_rule_has_at_least_three_mutants():
    counts = {name: sum(m.rule == name for m in M.MUTANTS) for name in RULES}
    assert min(counts.values()) >= 3, {k: v for k, v in counts.items() if v < 3}
    assert {m.rule for m in M.MUTANTS} <= set(RULES) | {"engine"}
    ids = [m.id for m in M.MUTANTS]
    assert len(ids) == len(set(ids)), "mutant ids must be unique"


@pytest.mark.parametrize("m", M.all_mutants()[: len(M.MUTANTS)], ids=lambda m: m.id)  # as the run applies them
def test_mutant_applies_changes_the_code_and_is_undone(m):
    module_name, fn_name = m.target.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    where = sys.modules[m.scope] if m.scope else None
    code_before = fn.__code__
    code = M.mutated_code(m)  # raises MutantError when the snippet is not there exactly once
    changed = [code.co_code != code_before.co_code, code.co_consts != code_before.co_consts,
               code.co_names != code_before.co_names]  # a method called by another name changes only the names
    assert any(changed), "the mutant changes nothing"
    with M.applied(m):
        if where is None:
            assert fn.__code__ is not code_before
        else:
            assert getattr(where, fn_name) is not fn and fn.__code__ is code_before  # only the rule's binding
    assert fn.__code__ is code_before
    if where is not None:
        assert getattr(where, fn_name) is fn
    assert M.tests_for(m) and all((ROOT / t.split("::")[0]).is_file() for t in M.tests_for(m))


def test_applied_restores_after_an_exception():
    m = M.select(names=["bn_fold/bias-unscaled"])[0]
    before = RULES["bn_fold"].fn.__code__
    with pytest.raises(RuntimeError):
        with M.applied(m):
            raise RuntimeError("a failing test run")
    assert RULES["bn_fold"].fn.__code__ is before


def test_a_snippet_that_is_not_there_is_an_error():
    m = M.Mutant("bn_fold", "typo", "no such code", "repalgebra.rules.bn_fold:bn_fold", "conv_bias(conv) * s * t", "0")
    with pytest.raises(M.MutantError, match="occurs 0 times"):
        M.mutated_code(m)


def _conv_bn():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b = GraphBuilder()
    x = b.input("x", (1, 4, 5, 5), torch.float64)
    y = b.conv2d(x, weight=r(4, 4, 3, 3), bias=r(4), padding=(1, 1, 1, 1))
    y = b.batch_norm(y, mean=r(4), var=r(4).abs() + 0.5, weight=r(4), bias=r(4))
    return b.build(y), r(1, 4, 5, 5)


@pytest.mark.parametrize("name", ["bn_fold/bias-unscaled", "bn_fold/eps-outside-sqrt", "engine/fold-in-own-dtype"])
def test_a_mutant_changes_what_fusion_computes_and_only_while_applied(name):
    graph, x = _conv_bn()
    if name.startswith("engine"):  # visible on a float16 graph only
        graph = graph.map_params(lambda p, n: p.to(torch.float16))
    truth = run_graph(graph, x)
    err = lambda: (run_graph(rewrite(graph)[0], x) - truth).abs().max().item()  # noqa: E731
    good = err()
    with M.applied(M.select(names=[name])[0]):
        bad = err()
    assert bad > 1.2 * good + 1e-12 and err() == good


def test_run_kills_a_mutant_in_a_worker():
    """The machinery end to end: a spawned worker, the unmutated baseline, one mutant killed by its rule's tests."""
    report = M.run(M.select(names=["scale_fold/bias-unscaled"]), jobs=1)
    assert [b.status for b in report.baselines] == ["passed"]
    assert report.results["scale_fold/bias-unscaled"].status == "killed", report.table()
    assert report.ok and "mutants killed: 1/1" in report.table()


@pytest.mark.skipif(os.environ.get("REPALGEBRA_MUTANTS") != "1", reason="full mutation run: REPALGEBRA_MUTANTS=1 (about 75 seconds)")
def test_every_mutant_is_killed():
    proc = subprocess.run([sys.executable, "-m", "repalgebra.mutants", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    n = len(M.all_mutants())  # the rules' and the stages' (repalgebra/mutants_stages.py)
    from repalgebra.mutants_stages import EQUIVALENT

    assert f"mutants killed: {n - len(EQUIVALENT)}/{n}" in out or f"mutants killed: {n}/{n}" in out, out
    per_rule = {name: sum(m.rule == name for m in M.MUTANTS) for name in repalgebra.RULES}
    assert min(per_rule.values()) >= 3, per_rule
