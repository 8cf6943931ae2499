"""attention_form: softmax(c q k^T) v written out is scaled dot-product attention with scale c.

Identity: for queries q (L, E), keys k (S, E), values v (S, Ev) and a number c (1 when there is no
scale op), with the written-out graph

    P = matmul(q, transpose(k, -2, -1))          (L, S) scores
    A = softmax(c * P, axis=-1)                   each row normalised over the keys
    out = matmul(A, v)

and scaled dot-product attention as defined by ``F.scaled_dot_product_attention`` (no mask,
no dropout, not causal) and by the ONNX ``Attention`` op:

    attention(q, k, v; c)[i, :] = sum_j exp(c <q_i, k_j>) v_j / sum_j exp(c <q_i, k_j>),

out == attention(q, k, v; c). Leading (batch, head) axes are independent copies of the same
computation, so one head is the whole proof.

Why: matmul(q, k^T)[i, j] = <q_i, k_j> exactly when the transpose swaps k's last two axes; the
softmax over the last axis is the normalised exp over j; the final matmul is the weighted sum of
the rows of v.

Preconditions: the transpose swaps the last two axes of k; the softmax is over the last axis
(the keys); a scale between the scores and the softmax has one factor c.

Configurations: 2 queries and 2 keys of 1 feature, 2 queries and 3 keys of 2 features, with
c = 1 and a symbolic c; values of 1 and 2 features.

REFUSED: a softmax over the queries (axis -2) normalises each column instead of each row:
shown symbolically at element (0, 0) with 2 queries and 2 keys.

Proof: symbolic q, k, v, c; exp kept as sympy.exp; the difference is brought to one fraction and
cancelled (``together`` + ``cancel``), an exact zero test.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import describe, symbols_tensor


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty((a.shape[0], b.shape[1]), dtype=object)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = sum(a[i, t] * b[t, j] for t in range(a.shape[1]))
    return out


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.vectorize(sympy.exp, otypes=[object])(x)
    return e / e.sum(axis=axis, keepdims=True)


def written_out(q, k, v, c, axis=-1):
    """The graph the rule matches: matmul(softmax(c * matmul(q, k^T), axis), v)."""
    return matmul(softmax(c * matmul(q, k.T), axis), v)


def attention(q, k, v, c):
    """Scaled dot-product attention from its definition, one query row at a time."""
    out = np.empty((q.shape[0], v.shape[1]), dtype=object)
    for i in range(q.shape[0]):
        w = [sympy.exp(c * sum(q[i, t] * k[j, t] for t in range(q.shape[1]))) for j in range(k.shape[0])]
        for m in range(v.shape[1]):
            out[i, m] = sum(w[j] * v[j, m] for j in range(k.shape[0])) / sum(w)
    return out


CONFIGS = [
    dict(L=2, S=2, E=1, Ev=1, c=1),
    dict(L=2, S=2, E=1, Ev=2, c="c"),
    dict(L=2, S=3, E=2, Ev=1, c="c"),
]


def _tensors(cfg):
    q = symbols_tensor("q", (cfg["L"], cfg["E"]))
    k = symbols_tensor("k", (cfg["S"], cfg["E"]))
    v = symbols_tensor("v", (cfg["S"], cfg["Ev"]))
    c = sympy.Symbol("c", positive=True) if cfg["c"] == "c" else sympy.Integer(cfg["c"])
    return q, k, v, c


def _zero(expr) -> bool:
    return sympy.cancel(sympy.together(expr)) == 0


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        q, k, v, c = _tensors(cfg)
        lhs, rhs = written_out(q, k, v, c), attention(q, k, v, c)
        for idx in np.ndindex(lhs.shape):
            if not _zero(lhs[idx] - rhs[idx]):
                raise AssertionError(f"attention_form {cfg}: element {idx} differs")
        done.append(describe("matmul(softmax(c q k^T), v) == attention(q, k, v; c)", **cfg))

    cfg = dict(L=2, S=2, E=1, Ev=1, c=1)
    q, k, v, c = _tensors(cfg)
    lhs, rhs = written_out(q, k, v, c, axis=-2), attention(q, k, v, c)
    if _zero(lhs[0, 0] - rhs[0, 0]):
        raise AssertionError("attention_form refused case: the softmax over the queries agrees")
    # A numeric witness (exp makes it irrational, so it is evaluated to 30 digits, far from 0).
    diff = lhs[0, 0] - rhs[0, 0]
    subs = {sym: n + 1 for n, sym in enumerate(sorted(diff.free_symbols, key=lambda t: t.name))}
    num = sympy.N(diff.subs(subs), 30)
    if abs(num) < 1e-6:
        raise AssertionError(f"attention_form refused case: witness {num} too close to 0")
    done.append(f"refused: softmax over the queries (axis -2), 2 queries x 2 keys: element (0, 0) differs "
                f"(numeric witness {float(num):.6g})")
    return done
