"""Hypothesis strategies for models whose layers reach every attribute the pipeline reads.

The stage tests (``tests/test_stage_*.py``) and the mutants of the front end and both back ends
(:mod:`repalgebra.mutants_stages`) need inputs on which a wrong attribute changes the output: a BatchNorm
or LayerNorm eps other than the default, norms without affine parameters, convs whose padding is
asymmetric after folding (an even kernel with ``padding='same'``, a ``ZeroPad2d`` before an unpadded
conv), strides and dilations that differ between the two axes, pools with ``ceil_mode``,
``count_include_pad=False`` and ``divisor_override``, and layout ops that move the channel axis.

* :func:`norm_eps` draws an eps log-uniform in ``[1e-6, 1e-2]`` (the range real models use: 1e-6 in
  ConvNeXt, 1e-5 PyTorch's default, 1e-3 in TensorFlow ports).
* :func:`layer_stacks` draws a :class:`LayerStack`: an ``nn.Sequential`` of one conv stage (optional
  ``ZeroPad2d``, ``Conv2d``, optional ``BatchNorm2d``), an optional activation, an optional constant pad
  that stays, an optional pool and an optional head (channels-last ``LayerNorm``, tokens with a
  ``LayerNorm`` and ``Linear``, or ``Flatten`` and ``Linear``), with an input it runs on.
* :data:`ATTRIBUTE_CASES` are hand-picked stacks, one per attribute, that the stage tests run on every
  capture path (deterministic: each attribute is reached whatever Hypothesis draws).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

__all__ = [
    "norm_eps", "LayerStack", "layer_stacks", "randomize_norms", "Tokens", "ChannelsLast", "ATTRIBUTE_CASES", "attribute_case",
    "assert_same_outputs", "onnx_outputs",
]


def norm_eps() -> st.SearchStrategy[float]:
    """A BatchNorm/LayerNorm eps, log-uniform in ``[1e-6, 1e-2]``."""
    return st.floats(-6.0, -2.0).map(lambda e: float(10.0**e))


class Tokens(nn.Module):
    """``(N, C, H, W) -> (N, H W, C)`` by ``x.flatten(2).transpose(1, 2)``, then ``norm`` and ``proj`` (a ViT stem)."""

    def __init__(self, norm: nn.Module, proj: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x.flatten(2).transpose(1, 2)))


class ChannelsLast(nn.Module):
    """``norm`` applied channels-last: ``x.permute(0, 2, 3, 1)``, ``norm``, ``permute(0, 3, 1, 2)`` (a ConvNeXt norm)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@dataclass(eq=False)
class LayerStack:
    """A generated model (eval mode, float64), an input it runs on, and a one-line description of its layers."""

    model: nn.Module
    x: torch.Tensor
    desc: str

    def __repr__(self) -> str:
        return f"LayerStack(x={tuple(self.x.shape)}, {self.desc})"


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm realistic statistics and every norm random affine parameters (in place); returns ``model``.

    Running variance log-uniform in ``[1e-3, 10]``, running mean and biases normal, weights normal
    around 1 (either sign): a wrong eps or a swapped statistic shows in the output.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                c = m.running_var.numel()
                m.running_var.copy_(10 ** (-3 + 4 * torch.rand(c, generator=gen, dtype=torch.float64)))
                m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
    return model


def _finish(makers: list[Callable[[], nn.Module]], shape: tuple[int, ...], seed: int, desc: list[str]) -> LayerStack | None:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the layers' own initialisation, reproducible, without touching the global generator
        model = randomize_norms(nn.Sequential(*[make() for make in makers]).double().eval(), seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    try:
        with torch.no_grad():
            y = model(x)
    except (RuntimeError, ValueError):  # an output size below 1, a window larger than the padded input, batch statistics of one value
        return None
    if y.numel() == 0:
        return None
    return LayerStack(model, x, "; ".join(desc))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def layer_stacks(draw, max_size: int = 9, heads: bool = True) -> LayerStack:
    """A small float64 model in eval mode whose layers reach the attributes the pipeline reads (see the module docstring).

    With ``heads=False`` no LayerNorm or Linear head is drawn (an export at an opset below 17 has no LayerNormalization).
    """
    seed = draw(st.integers(0, 2**31 - 1))
    cin, cout = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    groups = draw(st.sampled_from(_divisors(math.gcd(cin, cout))))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    dilation = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    padding_kind = draw(st.sampled_from(["int", "pair", "same", "valid"] if stride == (1, 1) else ["int", "pair", "valid"]))
    padding = {"int": draw(st.integers(0, 2)), "pair": (draw(st.integers(0, 2)), draw(st.integers(0, 2))), "same": "same", "valid": "valid"}[padding_kind]
    layers: list[Callable[[], nn.Module]] = []
    desc: list[str] = []
    if draw(st.booleans()):
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))  # (left, right, top, bottom): TF-"same" is uneven
        layers.append(lambda pads=pads: nn.ZeroPad2d(pads))
        desc.append(f"ZeroPad2d{pads}")
    bias = draw(st.booleans())
    layers.append(lambda: nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=bias))
    desc.append(f"Conv2d({cin}, {cout}, {kernel}, stride={stride}, padding={padding!r}, dilation={dilation}, groups={groups}, bias={bias})")
    if draw(st.booleans()):
        eps, affine, track = draw(norm_eps()), draw(st.booleans()), draw(st.sampled_from([True, True, True, False]))
        layers.append(lambda eps=eps, affine=affine, track=track: nn.BatchNorm2d(cout, eps=eps, affine=affine, track_running_stats=track))
        desc.append(f"BatchNorm2d(eps={eps:.2e}, affine={affine}, track_running_stats={track})")
    act = draw(st.sampled_from(["none", "relu", "gelu", "gelu-tanh"]))
    if act != "none":
        layers.append(nn.ReLU if act == "relu" else lambda: nn.GELU(approximate="tanh" if act == "gelu-tanh" else "none"))
        desc.append(act)
    if draw(st.booleans()):
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
        value = draw(st.sampled_from([-1.5, 0.25, 2.0]))
        layers.append(lambda pads=pads, value=value: nn.ConstantPad2d(pads, value))
        desc.append(f"ConstantPad2d({pads}, {value})")
    pool = draw(st.sampled_from(["none", "avg", "max"]))
    if pool != "none":
        k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        s = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
        ceil = draw(st.booleans())
        if pool == "avg":
            count, divisor = draw(st.booleans()), draw(st.sampled_from([None, None, 2, 5]))
            layers.append(lambda: nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=count, divisor_override=divisor))
            desc.append(f"AvgPool2d({k}, {s}, {p}, ceil_mode={ceil}, count_include_pad={count}, divisor_override={divisor})")
        else:
            d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
            p = tuple(min(pi, (di * (ki - 1) + 1) // 2) for pi, di, ki in zip(p, d, k))
            layers.append(lambda: nn.MaxPool2d(k, s, p, d, ceil_mode=ceil))
            desc.append(f"MaxPool2d({k}, {s}, {p}, dilation={d}, ceil_mode={ceil})")
    head = draw(st.sampled_from(["none", "channels-last-ln", "tokens", "flatten-linear"] if heads else ["none"]))
    if head == "channels-last-ln":
        eps, affine = draw(norm_eps()), draw(st.booleans())
        layers.append(lambda eps=eps, affine=affine: ChannelsLast(nn.LayerNorm(cout, eps=eps, elementwise_affine=affine)))
        desc.append(f"channels-last LayerNorm(eps={eps:.2e}, affine={affine})")
    elif head == "tokens":
        eps, affine, lbias = draw(norm_eps()), draw(st.booleans()), draw(st.booleans())
        out = draw(st.integers(1, 5))
        layers.append(lambda eps=eps, affine=affine: Tokens(nn.LayerNorm(cout, eps=eps, elementwise_affine=affine), nn.Linear(cout, out, bias=lbias)))
        desc.append(f"tokens LayerNorm(eps={eps:.2e}, affine={affine}) Linear(bias={lbias})")
    size = (draw(st.integers(1, 3)), cin, draw(st.integers(1, max_size)), draw(st.integers(1, max_size)))
    if head == "flatten-linear":  # the features depend on the spatial size: build once it is known
        stack = _finish(layers, size, seed, desc)
        assume(stack is not None)
        with torch.no_grad():
            features = stack.model(stack.x).flatten(1).shape[1]
        assume(features <= 256)
        lbias, out = draw(st.booleans()), draw(st.integers(1, 5))
        layers += [nn.Flatten, lambda: nn.Linear(features, out, bias=lbias)]
        desc.append(f"Flatten Linear(bias={lbias})")
    stack = _finish(layers, size, seed, desc)
    assume(stack is not None)
    return stack


# --------------------------------------------------------------------------- one stack per attribute


def _case(make: Callable[[], list[nn.Module]], shape: tuple[int, ...] = (2, 4, 9, 8), seed: int = 0) -> Callable[[], LayerStack]:
    def build() -> LayerStack:
        stack = _finish([lambda: nn.Sequential(*make())], shape, seed, [])
        assert stack is not None, f"an attribute case does not run on {shape}"
        stack.model = stack.model[0]
        stack.desc = repr(stack.model)
        return stack

    return build


def _spread(prelu: nn.PReLU) -> nn.PReLU:
    """A PReLU whose slopes differ per channel (they all start at 0.25): a slope on the wrong axis shows."""
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.5, 0.9, prelu.num_parameters))
    return prelu


def _cases() -> dict[str, Callable[[], LayerStack]]:
    conv = lambda k=3, **kw: nn.Conv2d(4, 6, k, **kw)  # noqa: E731
    return {
        "bn-eps": _case(lambda: [conv(padding=1), nn.BatchNorm2d(6, eps=1e-3), nn.ReLU()]),
        "bn-eps-small": _case(lambda: [conv(padding=1), nn.BatchNorm2d(6, eps=1e-6), nn.ReLU()]),
        "bn-no-affine": _case(lambda: [conv(padding=1), nn.BatchNorm2d(6, eps=1e-3, affine=False), nn.GELU()]),
        "bn-batch-stats": _case(lambda: [conv(padding=1), nn.BatchNorm2d(6, eps=1e-3, track_running_stats=False)]),
        "bn-alone": _case(lambda: [nn.BatchNorm2d(4, eps=2e-3), nn.ReLU(), conv(padding=(1, 0))]),
        "ln-eps-channels-last": _case(lambda: [conv(padding=1), ChannelsLast(nn.LayerNorm(6, eps=1e-2))]),
        "ln-eps-tokens": _case(lambda: [conv(padding=1), Tokens(nn.LayerNorm(6, eps=1e-6), nn.Linear(6, 3))]),
        "ln-spatial": _case(lambda: [conv(padding=1), nn.LayerNorm([9, 8], eps=2e-3)]),
        "ln-no-affine": _case(lambda: [conv(padding=1), Tokens(nn.LayerNorm(6, eps=3e-3, elementwise_affine=False), nn.Linear(6, 5, bias=False))]),
        "leaky-relu-slope": _case(lambda: [conv(padding=1), nn.LeakyReLU(0.3)]),
        "softplus-beta-threshold": _case(lambda: [conv(padding=1), nn.Softplus(beta=1.5, threshold=1.0)]),
        "prelu-per-channel": _case(lambda: [conv(padding=1), _spread(nn.PReLU(6)), nn.Conv2d(6, 6, 1), nn.PReLU()]),
        "conv-stride-dilation": _case(lambda: [conv(k=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2), bias=False), nn.ReLU()]),
        "conv-groups": _case(lambda: [nn.Conv2d(4, 6, 3, padding=(0, 1), groups=2), nn.BatchNorm2d(6, eps=1e-3), nn.ReLU()]),
        "conv-same-even": _case(lambda: [conv(k=(2, 4), padding="same", dilation=(2, 1)), nn.ReLU()]),
        "conv-tf-same": _case(lambda: [nn.ZeroPad2d((0, 1, 2, 0)), conv(stride=(1, 2)), nn.BatchNorm2d(6, eps=1e-3), nn.GELU(approximate="tanh")]),
        "conv-transpose": _case(lambda: [nn.ConvTranspose2d(4, 6, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, dilation=(1, 2)),
                                         nn.BatchNorm2d(6, eps=1e-3), nn.ReLU()]),
        "conv-transpose-dilated": _case(lambda: [nn.ConvTranspose2d(4, 6, (2, 3), (1, 2), (0, 1), (1, 1), bias=False, dilation=(2, 1)),
                                                 nn.GELU()]),
        "conv1d": _case(lambda: [nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.BatchNorm1d(6, eps=1e-3), nn.ReLU(),
                                 nn.Conv1d(6, 6, 4, padding="same", bias=False)], shape=(2, 4, 11)),
        "conv3d": _case(lambda: [nn.Conv3d(4, 6, (3, 2, 3), (2, 1, 1), (1, 0, 2), (2, 1, 1), groups=2), nn.BatchNorm3d(6, eps=1e-3),
                                 nn.ReLU()], shape=(2, 4, 6, 7, 5)),
        "conv-transpose3d": _case(lambda: [nn.ConvTranspose3d(4, 6, (3, 2, 3), (2, 1, 2), (1, 0, 2), (1, 0, 1), groups=2,
                                                              dilation=(1, 2, 1)), nn.BatchNorm3d(6, eps=1e-3), nn.ReLU()], shape=(2, 4, 3, 4, 5)),
        "conv3d-same": _case(lambda: [nn.Conv3d(4, 6, (1, 3, 3), padding="same", dilation=(1, 1, 2), bias=False), nn.GELU(),
                                      nn.Conv3d(6, 6, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0), groups=6)], shape=(2, 4, 6, 7, 5)),
        "pad-value": _case(lambda: [nn.ReLU(), nn.ConstantPad2d((2, 0, 1, 3), -1.5), conv(padding=0)]),
        "avg-pool-exclude-pad": _case(lambda: [conv(padding=1), nn.ReLU(), nn.AvgPool2d((3, 2), (2, 1), (1, 1), count_include_pad=False)]),
        "avg-pool-ceil": _case(lambda: [conv(padding=1), nn.ReLU(), nn.AvgPool2d(3, 2, (1, 0), ceil_mode=True)]),
        "avg-pool-ceil-exclude": _case(lambda: [conv(padding=1), nn.ReLU(), nn.AvgPool2d((2, 3), 2, (1, 1), ceil_mode=True, count_include_pad=False)]),
        "avg-pool-divisor": _case(lambda: [conv(padding=1), nn.ReLU(), nn.AvgPool2d(2, 2, divisor_override=3)]),
        "max-pool": _case(lambda: [conv(padding=1), nn.MaxPool2d((3, 2), (2, 1), (1, 0), dilation=(1, 2), ceil_mode=True)], shape=(2, 4, 10, 8)),
        "flatten-linear": _case(lambda: [conv(stride=2), nn.GELU(), nn.Flatten(), nn.Linear(6 * 4 * 3, 5)], shape=(2, 4, 9, 7)),
    }


ATTRIBUTE_CASES: dict[str, Callable[[], LayerStack]] = _cases()
"""Attribute name -> a builder of its :class:`LayerStack` (float64, eval mode, seeded)."""


def attribute_case(name: str) -> LayerStack:
    """The :class:`LayerStack` of :data:`ATTRIBUTE_CASES` called ``name`` (a fresh model each call)."""
    return ATTRIBUTE_CASES[name]()


# --------------------------------------------------------------------------- comparing a stage's output with the model's


def assert_same_outputs(ref, got, dtype: torch.dtype, what: str) -> None:
    """Assert ``max |got - ref| <= rtol * max |ref|`` per output, ``rtol`` 1e-9 for float64 and 1e-5 for float32.

    ``ref`` and ``got`` are tensors, arrays or sequences of them (one per output); ``what`` names the
    stage and the example in the message.
    """
    import numpy as np

    rtol = {torch.float64: 1e-9, torch.float32: 1e-5}[dtype]
    refs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
    gots = list(got) if isinstance(got, (list, tuple)) else [got]
    assert len(refs) == len(gots), f"{what}: {len(gots)} outputs instead of {len(refs)}"
    for k, (r, g) in enumerate(zip(refs, gots)):
        r = r.detach().double().numpy() if torch.is_tensor(r) else np.asarray(r, dtype=np.float64)
        g = g.detach().double().numpy() if torch.is_tensor(g) else np.asarray(g, dtype=np.float64)
        assert r.shape == g.shape, f"{what}: output {k} has shape {g.shape} instead of {r.shape}"
        # NaN and Inf must sit at the same places with the same values (a max pool whose window lies in the
        # padding gives -inf in both), as in verify.first_difference; the finite entries are compared below.
        finite = np.isfinite(r)
        assert np.array_equal(finite, np.isfinite(g)) and np.array_equal(np.isnan(r), np.isnan(g)), (
            f"{what}: output {k} has NaN or Inf at other places than the original's"
        )
        assert np.array_equal(r[np.isinf(r)], g[np.isinf(r)]), f"{what}: output {k} has other infinities than the original's"
        r, g = r[finite], g[finite]
        if not r.size:
            continue
        err, scale = float(np.abs(g - r).max()), float(np.abs(r).max())
        assert err <= rtol * scale, f"{what}: output {k} differs by {err:.3e} (relative {err / max(scale, 1e-300):.3e} > {rtol:.0e})"


def checked_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float32 inputs a stack is checked on: its own and a seeded other of the same shape."""
    return x.float(), torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def rounding_small(stack: LayerStack, share: float = 0.1) -> bool:
    """Whether float32 rounding moves the output of each of the stack's layers by at most ``share`` of the float32
    tolerance (1e-5 of the layer's largest output, as :func:`assert_same_outputs` measures) on the inputs
    :func:`checked_inputs` (what the stage tests run).

    Two measures, both against the float32 weights run in float64: the model in float32, and the float64 run with
    each layer's output moved by one float32 ulp (randomly up or down) and each GELU's by one ulp of its input
    (about what a float32 GELU is accurate to: PyTorch's and onnxruntime's differ by that much, far more than the
    output deep in the GELU's tail).  The second asks how much the stack amplifies rounding wherever it happens:
    PyTorch's own float32 run can round luckily where onnxruntime's, summing in another order, does not (a
    batch-statistics BatchNorm, then a LayerNorm of two near-equal channels: 1.04e-5 apart in onnxruntime).  Where rounding moves
    an output more (a LayerNorm of near-equal values, a Linear whose terms cancel, every output in a GELU's tail, a
    batch-statistics BatchNorm of a constant), two right float32 computations, PyTorch's and onnxruntime's, can
    differ by more than the tolerance: such a draw cannot tell a wrong export from rounding and is rejected, not
    compared with a wider tolerance.  Each layer is measured, not only the last: the fallback checks each region's
    export on its own outputs, and a max pool whose windows all lie in the padding hides the layers before it.
    """
    m32 = copy.deepcopy(stack.model).float()
    m64 = copy.deepcopy(m32).double()
    gen = torch.Generator().manual_seed(0)

    def one_ulp_of_input(m: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        sign = torch.randint(0, 2, out.shape, generator=gen, dtype=out.dtype) * 2 - 1
        return out + 2.0**-23 * inputs[0].abs() * sign

    def one_ulp_of_output(m: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        sign = torch.randint(0, 2, out.shape, generator=gen, dtype=out.dtype) * 2 - 1
        return out + 2.0**-23 * out.abs() * sign

    def layer_outputs(model: nn.Module, x: torch.Tensor, perturb: bool = False) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        handles = [m.register_forward_hook(one_ulp_of_input) for m in model.modules() if perturb and isinstance(m, nn.GELU)]
        handles += [m.register_forward_hook(one_ulp_of_output) for m in model.children() if perturb]
        handles += [m.register_forward_hook(lambda m, i, out: seen.append(out.double())) for m in model.children()]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        return seen

    def moved(ref: torch.Tensor, got: torch.Tensor) -> bool:
        finite = torch.isfinite(ref)  # a max pool's window in the padding: -inf in both
        if not finite.any():
            return False
        if not torch.isfinite(got[finite]).all():
            return True
        return not (got - ref)[finite].abs().max() <= share * 1e-5 * ref[finite].abs().max()

    with torch.no_grad():
        for xi in checked_inputs(stack.x):
            refs = layer_outputs(m64, xi.double())
            for gots in (layer_outputs(m32, xi), layer_outputs(m64, xi.double(), perturb=True)):
                if any(moved(r, g) for r, g in zip(refs, gots)):
                    return False
    return True


def onnx_outputs(proto, *xs: torch.Tensor) -> list:
    """Run an ONNX model in onnxruntime (CPU, one thread) on ``xs``; returns its outputs (numpy arrays)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.detach().numpy() for i, x in zip(session.get_inputs(), xs)})
