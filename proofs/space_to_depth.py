"""space_to_depth: a conv of the r x r phases of x, concatenated as channels, is one strided conv of x.

Identity: x of C channels and H x W pixels (H, W multiples of r); the phase (a, b), 0 <= a, b < r,
is x[:, a::r, b::r] (C x H/r x W/r); the phases are concatenated along the channels in some order
g -> (a_g, b_g) covering each phase once, and convolved with W (O, r*r*C, k_h, k_w), bias b, stride
s and zero padding P = (top, bottom, left, right). Then

    W'[o, c, r*u + a_g, r*v + b_g] = W[o, g*C + c, u, v]      (O, C, r*k_h, r*k_w)

    conv(cat_g phase_g(x); W, b, stride s, padding P) == conv(x; W', b, stride r*s, padding r*P)

Why: output (i, j) of the left side reads, through tap (u, v) of phase g, pixel
(r*(s*i + u - top) + a_g, r*(s*j + v - left) + b_g) of x, or a padding zero when
s*i + u - top is outside [0, H/r) (that is when the pixel row is outside [0, H)). That is tap
(r*u + a_g, r*v + b_g) of a conv of x with stride r*s and padding r*top; every tap of W' is one
tap of one phase (the phases cover each residue once), and the output sizes agree:
(H/r + top + bottom - k_h) // s + 1 == (H + r*top + r*bottom - r*k_h) // (r*s) + 1.

Configurations: YOLOv5's Focus (r = 2, its phase order, k = 3, padding 1, bias), another phase
order with stride 2 and asymmetric padding, r = 3 with a 1x1 conv; all with symbolic x, W, b.

REFUSED: a grouped conv of the phases (groups = 2 over the 4 phases). Each output channel reads
only its group's phases; the formula above, applied to the grouped weight's blocks as if they
were the whole, puts them on the wrong phases (shown). Written dense first (zero blocks, shown
exact) it would apply, but the one conv of x then does g times the grouped conv's work, so the
library leaves it.

Proof: symbolic tensors; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np

from .symbolic import assert_differs, assert_equal, conv2d, describe, symbols_tensor

YOLO_FOCUS = [(0, 0), (1, 0), (0, 1), (1, 1)]  # x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]


def phases(x: np.ndarray, r: int, order: list[tuple[int, int]]) -> np.ndarray:
    """The channel concat of x[:, a::r, b::r] for (a, b) in ``order``."""
    return np.concatenate([x[:, a::r, b::r] for a, b in order], axis=0)


def fuse(w: np.ndarray, r: int, order: list[tuple[int, int]]) -> np.ndarray:
    """W'[o, c, r u + a_g, r v + b_g] = W[o, g C + c, u, v]."""
    O, cin, kh, kw = w.shape
    C = cin // len(order)
    dense = np.zeros((O, C, r * kh, r * kw), dtype=object)
    for g, (a, b) in enumerate(order):
        dense[:, :, a::r, b::r] = w[:, g * C : (g + 1) * C]
    return dense


CONFIGS = [
    dict(name="YOLOv5 Focus", C=1, H=4, W=4, O=2, r=2, k=3, stride=1, padding=(1, 1, 1, 1), order=YOLO_FOCUS, bias=True),
    dict(name="phases in another order, strided", C=1, H=4, W=6, O=1, r=2, k=2, stride=2, padding=(1, 0, 0, 1),
         order=[(1, 1), (0, 1), (1, 0), (0, 0)], bias=False),
    dict(name="r = 3, 1x1 conv", C=1, H=3, W=6, O=1, r=3, k=1, stride=1, padding=(0, 0, 0, 0),
         order=[(a, b) for b in range(3) for a in range(3)], bias=True),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        C, r, k, order = cfg["C"], cfg["r"], cfg["k"], cfg["order"]
        x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
        w = symbols_tensor("w", (cfg["O"], r * r * C, k, k))
        b = symbols_tensor("b", (cfg["O"],)) if cfg["bias"] else None
        lhs = conv2d(phases(x, r, order), w, b, stride=cfg["stride"], padding=cfg["padding"])
        rhs = conv2d(x, fuse(w, r, order), b, stride=r * cfg["stride"], padding=tuple(r * p for p in cfg["padding"]))
        desc = describe("conv(cat phases(x)) == conv(x; W', stride r s, padding r P)", case=cfg["name"], x=(C, cfg["H"], cfg["W"]),
                        r=r, kernel=k, stride=cfg["stride"], padding=cfg["padding"], bias=cfg["bias"])
        assert_equal(lhs, rhs, f"space_to_depth {desc}")
        done.append(desc)

    # REFUSED: groups = 2 over the four phases of one channel.
    x = symbols_tensor("x", (1, 2, 2))
    w = symbols_tensor("w", (2, 2, 1, 1))  # each output channel reads two phases
    lhs = conv2d(phases(x, 2, YOLO_FOCUS), w, None, groups=2)
    full = np.zeros((2, 4, 1, 1), dtype=object)
    full[0, :2], full[1, 2:] = w[0], w[1]  # the grouped weight written out dense: this one is exact
    assert_equal(lhs, conv2d(phases(x, 2, YOLO_FOCUS), full, None), "space_to_depth: a grouped conv written dense")
    naive = fuse(w, 2, YOLO_FOCUS[:2])  # the formula applied to the grouped weight's two phases per group
    rhs = conv2d(x, naive, None, stride=2)
    diff, num = assert_differs(lhs, rhs, (1, 0, 0), "space_to_depth refused case")
    done.append(f"refused: groups=2 over the 4 phases: W' from the grouped W puts output 1 on phases (0, 0), (1, 0) "
                f"instead of (0, 1), (1, 1): lhs - rhs = {diff} at (1, 0, 0) (numeric witness {num})")
    return done
