"""linear_seq_merge: a Linear after a Linear is one Linear.

Identity: with W1 (M, I), b1 (M,), W2 (O, M), b2 (O,) (a missing bias is 0),

    W[o, i] = sum_m W2[o, m] * W1[m, i]
    b[o]    = b2[o] + sum_m W2[o, m] * b1[m]

    Linear(Linear(x; W1, b1); W2, b2) == Linear(x; W, b).

Why: each token's features are mapped by y = W1 x + b1, then z = W2 y + b2 = (W2 W1) x + (W2 b1 + b2);
the Linear reads the last axis only, so the leading axes (batch, tokens) pass through untouched, and
there is no padding or window to break the composition.

Precondition (cost, not exactness): O I <= M I + O M, or the outer output is summed with a Linear
of x of shape (O, I), which absorbs the merge.  It is checked by the rule, not here: the identity
holds either way.

Configurations: a (2, 3) batch of tokens through 3 -> 2 -> 4 features with both biases, a 4 -> 2 -> 3
pair without the inner bias, a LoRA pair (rank 1, no biases, 3 -> 1 -> 3) summed with a base Linear
(with the branch_sum identity after it), and a (1, 2, 2) input with only the inner bias.

Proof: symbolic x, weights and biases; both sides are polynomials, so expand(lhs - rhs) == 0 is exact.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import assert_equal, describe, linear, symbols_tensor

# x shape (last axis I), M, O, inner bias, outer bias
CONFIGS = [
    dict(shape=(2, 3), M=2, O=4, b1=True, b2=True),
    dict(shape=(1, 4), M=2, O=3, b1=False, b2=True),
    dict(shape=(1, 2, 2), M=3, O=2, b1=True, b2=False),
]


def merge(w1, b1, w2, b2):
    """(W, b) of the one Linear; ``b`` is None where neither Linear has a bias."""
    O, M = w2.shape
    I = w1.shape[1]
    w = np.empty((O, I), dtype=object)
    for o in range(O):
        for i in range(I):
            w[o, i] = sympy.Add(*(w2[o, m] * w1[m, i] for m in range(M)))
    if b1 is None and b2 is None:
        return w, None
    b = np.empty(O, dtype=object)
    for o in range(O):
        b[o] = (b2[o] if b2 is not None else 0) + (sympy.Add(*(w2[o, m] * b1[m] for m in range(M))) if b1 is not None else 0)
    return w, b


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        x = symbols_tensor("x", cfg["shape"])
        I, M, O = cfg["shape"][-1], cfg["M"], cfg["O"]
        w1, w2 = symbols_tensor("u", (M, I)), symbols_tensor("v", (O, M))
        b1 = symbols_tensor("c", (M,)) if cfg["b1"] else None
        b2 = symbols_tensor("d", (O,)) if cfg["b2"] else None
        lhs = linear(linear(x, w1, b1), w2, b2)
        rhs = linear(x, *merge(w1, b1, w2, b2))
        desc = describe("Linear(Linear(x)) == Linear(x)", x=cfg["shape"], features=f"{I} -> {M} -> {O}", b1=cfg["b1"], b2=cfg["b2"])
        assert_equal(lhs, rhs, "linear_seq_merge " + desc)
        done.append(desc)
    done.append(prove_lora())
    return done


def prove_lora() -> str:
    """LoRA, ``base(x) + s B(A(x))`` with ``s`` already in ``B``: B A merged, then summed with ``base`` (branch_sum)."""
    x = symbols_tensor("x", (2, 3))
    base_w, base_b = symbols_tensor("w", (3, 3)), symbols_tensor("b", (3,))
    a, bmat = symbols_tensor("a", (1, 3)), symbols_tensor("e", (3, 1))
    lhs = linear(x, base_w, base_b) + linear(linear(x, a), bmat)
    w, _ = merge(a, None, bmat, None)
    rhs = linear(x, base_w + w, base_b)
    assert_equal(lhs, rhs, "linear_seq_merge LoRA")
    return "LoRA rank 1, 3 -> 1 -> 3 summed with base Linear(3 -> 3): W_base + B A, b_base"
