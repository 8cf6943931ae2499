"""sum_regroup: the branches of one input in a sum are added first, wherever the sum writes them.

Identity: for any tensors g, a, b of one shape (elementwise addition is associative and commutative),

    (g + a) + b == g + (a + b)        (a + g) + b == (a + b) + g

and, for a sum of several terms, any regrouping and reordering of them: the rule writes each group of
branches of one input (a conv or BN of x, a channel scale of x, x itself) as a sum of its own, its
first conv or BN first, the groups and the other terms then added in the order of their first term.

The regrouping is what lets the other rules see the branches side by side. With g a nonlinear branch
(a gate, sigmoid(conv(x))), a 1x1 conv and a BN of x:

    (g + conv_1x1(x; W, c)) + BN(x) == g + conv_1x1(x; W + diag(s), c + t)

(bn_to_conv makes the BN the 1x1 conv (diag(s), t), branch_sum adds the two); the second
configuration below proves it with symbolic weights and BN statistics.

Proof: symbolic tensors; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np

from .symbolic import add, assert_equal, batch_norm, bn_scale_shift, bn_symbols, conv2d, symbols_tensor


def prove() -> list[str]:
    done = []
    g, a, b = (symbols_tensor(n, (2, 2, 3)) for n in ("g", "a", "b"))
    assert_equal(add(add(g, a), b), add(g, add(a, b)), "sum_regroup (g + a) + b")
    assert_equal(add(add(a, g), b), add(add(a, b), g), "sum_regroup (a + g) + b")
    done.append("(g + a) + b == g + (a + b) and (a + g) + b == (a + b) + g, tensors (2, 2, 3)")

    x, w, c = symbols_tensor("x", (2, 3, 3)), symbols_tensor("w", (2, 2, 1, 1)), symbols_tensor("c", (2,))
    gate, bn = symbols_tensor("g", (2, 3, 3)), bn_symbols("", 2)
    lhs = add(add(gate, conv2d(x, w, c)), batch_norm(x, *bn))
    s, t = bn_scale_shift(*bn)
    merged_w = w.copy()
    for o in range(2):
        merged_w[o, o, 0, 0] = w[o, o, 0, 0] + s[o]
    merged_c = np.array([c[o] + t[o] for o in range(2)], dtype=object)
    rhs = add(gate, conv2d(x, merged_w, merged_c))
    assert_equal(lhs, rhs, "sum_regroup gate + 1x1 + BN")
    done.append("(g + conv_1x1(x; W, c)) + BN(x) == g + conv_1x1(x; W + diag(s), c + t), C=2, 3x3")
    return done
