"""identity_elim: an identity op is removed; its readers read its input instead.

Identity (elementwise, for every tensor x of every shape):

    identity(x) = x

so for any op f reading it, f(identity(x)) = f(x). The rewrite replaces every use of the
identity's output value by its input value; there are no parameters to fuse
(:func:`fuse` returns the replacement value, ``x`` itself).

Preconditions: none. ``nn.Identity`` modules and no-op dropouts (eval mode, or p = 0) are
traced to this op by the frontend; that tracing is the frontend's business and is not part of
this identity.

Proof: trivial, but stated and checked like every other rule: symbolic tensors of several
ranks (an unbatched (C, H, W) activation, a batched (B, C, H, W) one, (B, N, C) tokens, a
vector) pass through :func:`proofs.symbolic.identity` and are compared with ``x`` by
``expand(lhs - rhs) == 0`` elementwise; and one use inside a graph, conv(identity(x)) +
identity(x) == conv(x) + x, shows the readers are unaffected.
"""

from __future__ import annotations

from .symbolic import add, assert_equal, conv2d, describe, identity, symbols_tensor


def fuse(x):
    """The value that replaces ``identity(x)``: ``x`` itself (no parameters)."""
    return x


SHAPES = [(2, 3, 3), (2, 2, 2, 3), (1, 4, 3), (5,)]


def prove() -> list[str]:
    done = []
    for shape in SHAPES:
        x = symbols_tensor("x", shape)
        assert_equal(identity(x), fuse(x), f"identity_elim shape={shape}")
        done.append(describe("identity(x) == x", shape=shape))

    # Inside a graph: the readers of identity(x) see exactly x.
    x = symbols_tensor("x", (2, 3, 3))
    w = symbols_tensor("w", (2, 2, 3, 3))
    b = symbols_tensor("b", (2,))
    lhs = add(conv2d(identity(x), w, b, padding=1), identity(x))
    rhs = add(conv2d(fuse(x), w, b, padding=1), fuse(x))
    assert_equal(lhs, rhs, "identity_elim inside conv + residual")
    done.append(describe("conv(identity(x)) + identity(x) == conv(x) + x", C=2, H=3, W=3, k=(3, 3)))
    return done
