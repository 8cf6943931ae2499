"""Scale into conv: a per-channel scale before a conv folds into its kernel, padded or not.

    conv(s * x; W, b) = conv(x; W[o,i] * s[i], b)      (i the input channel, within o's group)

A zero-padded conv pads ``s * x`` with zeros, and ``s * 0 = 0``: padding ``x``
and scaling the kernel is the same, at the border too (unlike a BN, whose
shift makes ``BN(0) != 0``: see ``bn_before_conv``).  It folds NFNet's
``gamma * act(x)`` and ``act(x) * beta`` and an input divided by a
per-channel std into the conv that reads them.

Preconditions: the scale acts on the channel axis (axis 1), and only the conv
reads its output.
"""

from repalgebra.kernels import per_input_channel
from repalgebra.match import conv_with, producer, sole_use
from repalgebra.rules.registry import Rewrite, rule


@rule("scale_into_conv", on="conv2d")
def scale_into_conv(graph, conv):
    sc = producer(conv.x, "scale")
    if sc is None or sc.attrs["axis"] % len(sc.x.shape) != 1 or not sole_use(graph, sc.out):
        return None
    w = conv.params["weight"]
    s = per_input_channel(sc.params["scale"].to(w.dtype), w.shape, conv.attrs["groups"])  # laid out like W[o, i]
    new = conv_with(conv, sources=(sc,), inputs=(sc.x,), weight=w * s[:, :, None, None])
    return Rewrite(conv.out, new.out, (new,))
