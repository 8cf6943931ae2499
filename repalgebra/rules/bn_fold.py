"""BN folding: a conv (2-D, 3-D or transposed) followed by an eval-mode BatchNorm is one conv.

    BN(conv(x; W, b)) = conv(x; W * s[o], b * s + t)
    where s = gamma / sqrt(var + eps), t = beta - mean * s   (per output channel o)

A transposed conv (``nn.ConvTranspose2d``) stores its weight as ``(C_in, C_out / groups, kh, kw)``: output
channel ``o`` is column ``o mod (C_out / groups)`` of the rows of its group, so the same ``s[o]`` scales
those columns.  The identity is the same for a 3-D conv (``nn.Conv3d`` + ``BatchNorm3d`` in video models):
``W`` is ``(C_out, C_in / groups, kd, kh, kw)`` and ``s[o]`` scales row ``o`` of it.

A BN after a channel concat of convs (MixConv: each conv reads its own split of the input) is one BN per
slice, and each slice folds into the conv that makes it:

    BN(cat(conv_1(x_1), ..., conv_n(x_n))) = cat(conv_1'(x_1), ..., conv_n'(x_n))

A BN after a sum (``add``/``sub``, nested) of convs that read different inputs (RepNeXt's
``norm(conv_7x7(x) + conv_7x1(conv_1x7(x)))``) is the scale folded into every conv and the shift into the
first:

    BN(conv_1(x_1) ± ... ± conv_n(x_n)) = conv_1'(x_1; s W_1, s b_1 + t) ± ... ± conv_n'(x_n; s W_n, s b_n)

(a subtracted first conv takes the shift negated).  A term of one value per channel (and per sample),
broadcast over the other axes (a diffusion ResBlock's ``conv(x) + time_mlp(t)[:, :, None, None]``), is scaled:

    BN(conv(x) + e) = conv'(x; s W, s b + t) + s * e

A BN after a pixel shuffle of a conv (EDSR's upsampler with ``bn=True``: ``conv``, ``PixelShuffle(r)``,
``BatchNorm2d``) folds into the conv before the shuffle: output channel ``c`` of the shuffle holds the conv's
channels ``[c r², (c + 1) r²)`` (each spread over an r x r block of pixels), so

    BN(pixel_shuffle(conv(x; W, b), r)) = pixel_shuffle(conv(x; W * s', b * s' + t'), r)
    where s'[o] = s[o // r²], t'[o] = t[o // r²]

A BN on a channel piece of a conv (IBN-Net's ``cat(IN(h[:, :c]), BN(h[:, c:]))`` after one conv, also a ``chunk``
or a strided slice) folds into the rows of the conv that the piece reads, where every other reader of the conv is a
piece of other channels: for the channels ``idx`` the piece reads, in its order,

    BN(conv(x; W, b)[:, idx]) = conv(x; W', b')[:, idx]
    where W'[idx[j]] = W[idx[j]] * s[j], b'[idx[j]] = b[idx[j]] * s[j] + t[j], the other rows as they were

Preconditions: the BN reads a ``conv2d``, ``conv3d``, ``conv_transpose2d`` or ``conv_transpose3d`` whose output nothing else reads, or a
concat along the channels, or a sum of the BN's shape, read by nothing else, of such convs, or a pixel shuffle of a
4-D map (a batch axis, then channels) of such a conv, the conv read by the shuffle alone and the shuffle by the BN, or a channel piece (``slice``, ``piece``, ``chunk`` on axis 1, keeping the rank) of such a conv,
read by the BN alone, the conv read by nothing but channel pieces that share no channel with the BN's.  Any stride,
padding, output padding, dilation and groups: BN acts on each output channel alone.
"""

import torch

from repalgebra.ir import Node
from repalgebra.kernels import bn_affine, conv_bias, per_input_channel
from repalgebra.match import conv_with, producer, sole_use
from repalgebra.ops import TRANSPOSED_CONVS, op_def
from repalgebra.rules.registry import Refusal, Rewrite, rule

_CONVS = ("conv2d", "conv3d", *TRANSPOSED_CONVS)
_PIECES = ("slice", "piece", "chunk")  # (a part of a value along one axis)
_SUMS = ("add", "sub", "broadcast_add", "broadcast_sub")  # (the broadcast ones: a term of another shape, see below)


@rule("bn_fold", on="batch_norm")
def bn_fold(graph, bn):
    conv = producer(bn.x, *_CONVS)
    if conv is None:
        return _through_concat(graph, bn) or _through_sum(graph, bn) or _through_shuffle(graph, bn) or _through_piece(graph, bn)
    if not sole_use(graph, conv.out):
        return Refusal(f"the {'transposed ' * (conv.op in TRANSPOSED_CONVS)}conv before it is also read elsewhere")
    s, t = bn_affine(bn)
    new = _folded(conv, s, t, bn)
    return Rewrite(bn.out, new.out, (new,))


def _folded(conv, s, t, bn):
    """``conv`` with the per-output-channel affine ``s * y + t`` folded in."""
    w = conv.params["weight"]
    if conv.op not in TRANSPOSED_CONVS:  # (C_out, C_in / g, *kernel): output channel o is row o
        w = w * s.reshape(-1, *[1] * (w.dim() - 1))
    else:  # (C_in, C_out / g, *kernel): the scale of output channel o laid out like the weight's rows and columns
        w = w * per_input_channel(s, w.shape[:2], conv.attrs["groups"]).reshape(*w.shape[:2], *[1] * (w.dim() - 2))
    return conv_with(conv, sources=(bn,), weight=w, bias=conv_bias(conv) * s + t)


def _through_concat(graph, bn):
    """``BN(cat(conv_1, ..., conv_n))`` on channels: each conv folds its slice of the BN."""
    cat = producer(bn.x, "concat")
    if cat is None or len(bn.x.shape) != 4 or cat.attrs["axis"] not in (1, -3):
        return None
    convs = [producer(v, *_CONVS) for v in cat.inputs]
    if any(c is None for c in convs):
        return None
    if not sole_use(graph, cat.out) or any(not sole_use(graph, c.out) for c in convs):
        return Refusal("the concat before it, or a conv in it, is also read elsewhere")
    s, t = bn_affine(bn)
    new, start = [], 0
    for c in convs:
        end = start + c.out.shape[1]
        new.append(_folded(c, s[start:end], t[start:end], bn))
        start = end
    joined = cat.replace(inputs=tuple(n.out for n in new))
    return Rewrite(bn.out, joined.out, (*new, joined))


def _through_sum(graph, bn):
    """``BN(conv_1 ± conv_2 ± ... ± e)``: every conv folds the scale, the first one also the shift (with its sign),
    and a term ``e`` of one value per channel (and per sample), broadcast over the rest, is scaled."""
    if producer(bn.x, *_SUMS) is None:
        return None
    s, t = bn_affine(bn)
    nodes, shift = [], [t]  # the shift goes into the first conv of the sum, with the sign the sum gives it
    shared = []

    def folded(value, sign):
        n = value.producer
        if n is not None and n.op in _SUMS and value.shape == bn.x.shape:
            inputs = [folded(v, -sign if n.op.endswith("sub") and k == 1 else sign) for k, v in enumerate(n.inputs)]
            if None in inputs:
                return None
            nodes.append(n.replace(inputs=tuple(inputs)))
        elif n is not None and n.op in _CONVS and value.shape == bn.x.shape:
            nodes.append(_folded(n, s, sign * shift.pop() if shift else torch.zeros_like(t), bn))
        elif _per_channel_term(value, bn.x):  # read as it is: others may read it too
            nodes.append(Node.make("scale", [value], {"axis": 1}, {"scale": s.to(value.dtype or s.dtype)}, bn.source))
            return nodes[-1].out
        else:
            return None
        if not sole_use(graph, value):
            shared.append(n)
        return nodes[-1].out

    new = folded(bn.x, 1)
    if new is None or shift:  # (no conv took the shift: a sum of no convs)
        return None
    if shared:
        return Refusal("the sum before it, or a conv in it, is also read elsewhere")
    return Rewrite(bn.out, new, tuple(nodes))


def _through_shuffle(graph, bn):
    """``BN(pixel_shuffle(conv, r))``: the shuffle's channel ``c`` is the conv's channels ``[c r², (c + 1) r²)``, so the
    conv folds ``s`` and ``t`` each repeated ``r²`` times, and the shuffle is rebuilt after it."""
    shuffle = producer(bn.x, "pixel_shuffle")
    if shuffle is None or len(bn.x.shape) != 4:  # (B, C, H, W): pixel_shuffle reads the last three axes as C, H, W
        return None
    conv = producer(shuffle.x, *_CONVS)
    if conv is None:
        return None
    if not sole_use(graph, bn.x) or not sole_use(graph, conv.out):
        return Refusal("the conv before the pixel shuffle, or the shuffle, is also read elsewhere")
    block = shuffle.attrs["factor"] ** 2
    s, t = bn_affine(bn)
    new = _folded(conv, s.repeat_interleave(block), t.repeat_interleave(block), bn)
    moved = shuffle.replace(inputs=(new.out, *shuffle.inputs[1:]))
    return Rewrite(bn.out, moved.out, (new, moved))


def _through_piece(graph, bn):
    """``BN(conv(x)[:, idx])``, every other reader of the conv a piece of other channels: the conv's rows ``idx`` fold
    the BN, its other rows stay, and every piece reads the folded conv."""
    part = producer(bn.x, *_PIECES)
    conv = producer(part.x, *_CONVS) if part is not None else None
    if conv is None or conv.out.shape is None or _channels_read(part, conv.out) is None or len(bn.x.shape) != len(conv.out.shape):
        return None  # (an unbind of the channels drops their axis: the BN's channels are another axis then)
    readers = graph.users(conv.out)
    rows = [_channels_read(n, conv.out) for n in readers]
    if graph.num_uses(conv.out) != len(readers) or None in rows or not sole_use(graph, part.out):
        return Refusal("the conv before the channel piece is also read whole elsewhere, or the piece is")
    mine = rows[readers.index(part)]
    if any(set(r) & set(mine) for n, r in zip(readers, rows) if n is not part):
        return Refusal("another piece of the conv before it reads some of the same channels")
    s, t = bn_affine(bn)
    scale, shift = torch.ones(conv.out.shape[1], dtype=s.dtype), torch.zeros(conv.out.shape[1], dtype=t.dtype)
    scale[mine], shift[mine] = s, t
    new = _folded(conv, scale, shift, bn)
    moved = part.replace(inputs=(new.out, *part.inputs[1:]))
    return Rewrite(conv.out, new.out, (new, moved), also=((bn.out, moved.out),))


def _channels_read(node, value) -> list[int] | None:
    """The channels of ``value`` (``(B, C, ...)``) that ``node`` reads, in its order, where it is a piece of ``value``
    along the channels; else None.  The piece's own semantics, run on the channel numbers, say which."""
    rank = len(value.shape)
    if node.op not in _PIECES or node.x is not value or any(v is value for v in node.inputs[1:]) or node.attrs["axis"] % rank != 1:
        return None
    channels = torch.arange(value.shape[1]).reshape(1, -1, *[1] * (rank - 2))
    return op_def(node.op).run(channels, **node.attrs).reshape(-1).tolist()


def _per_channel_term(value, like) -> bool:
    """Whether ``value`` is a term of a sum of ``like``'s shape that holds one number per channel (and per sample),
    broadcast over the other axes: a diffusion ResBlock's ``time_mlp(t)[:, :, None, None]``, a class-conditional
    bias.  A BN after the sum scales it (``s * e``, a small tensor), and folds into the convs beside it.  A term of
    the sum's own shape is none (where the map is 1 x 1 a conv of that shape is one too, and the convs of a sum
    merge first, which the scale would stop)."""
    shape, full = value.shape, like.shape
    return (shape is not None and full is not None and len(shape) == len(full) > 2 and shape != full
            and shape[1] == full[1] and shape[0] in (1, full[0]) and all(d == 1 for d in shape[2:]))
