"""Runnable sympy proofs, one module per fusion rule of ``repalgebra.rules``.

Each module states its identity and preconditions in its docstring, exposes the fused-
parameter formula(s) it proves (``fuse`` ...), and ``prove() -> list[str]`` which proves the
identity exactly (``sympy.expand(lhs - rhs) == 0`` elementwise) at several small concrete
configurations with symbolic weights, biases, BN statistics and inputs, and shows a symbolic
counterexample for each refused case (descriptions starting with ``refused:``). It raises
``AssertionError`` naming the first differing element if anything does not hold.

Run all of them with ``python -m proofs``. The shared reference implementation of the
operators is :mod:`proofs.symbolic`.
"""

from __future__ import annotations

import importlib

# Fixed order: primitives first (lemmas before their users), composites last.
RULES = [
    "identity_elim",
    "bn_fold",
    "bn_to_conv",
    "identity_to_conv",
    "kernel_pad",
    "dilation_to_dense",
    "pad_absorb",
    "crop_into_conv",
    "crop_before_conv",
    "pad_share",
    "border_fill",
    "regroup",
    "branch_sum",
    "sum_regroup",
    "scale_fold",
    "bias_fold",
    "seq_merge",
    "avg_pool_to_conv",
    "space_to_depth",
    "concat_merge",
    "bn_before_conv",
    "scale_into_conv",
    "bn_into_linear",
    "linear_affine_fold",
    "linear_seq_merge",
    "query_scale_fold",
    "attention_form",
    "repmixer",
    "cpe",
]


def load(name: str):
    """Import ``proofs.<name>``."""
    if name not in RULES:
        raise KeyError(f"unknown rule proof {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def is_refused(description: str) -> bool:
    return description.startswith("refused:")
