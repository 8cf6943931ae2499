"""Loading fused (reparameterized) FastViT checkpoints into the train-time model.

Apple's ``reparameterize_model`` (``apple/ml-fastvit``, ``models/modules/mobileone.py``)
and timm's replace every reparameterizable unit by one conv with bias and drop
its branches. A fused state dict therefore holds, per unit:

=====================================  ==========================  ===========================
unit (our module)                      Apple key                   timm key
=====================================  ==========================  ===========================
:class:`MobileOneBlock` (stem,         ``<p>.reparam_conv.*``      ``<p>.reparam_conv.*``
``proj.1``, ``conv_exp``; SE kept)
:class:`RepMixer` (mixer, norm and     ``<p>.reparam_conv.*``      ``<p>.reparam_conv.*``
its layer scale folded, identity in)
:class:`ReparamLargeKernelConv`        ``<p>.lkb_reparam.*``       ``<p>.reparam_conv.*``
:class:`RepCPE` (identity folded in)   ``network.N.reparam_conv``  ``stages.S.pos_emb.reparam_conv``
=====================================  ==========================  ===========================

Everything else is kept under its train-time name: each ConvFFN's
``convffn.conv.conv``/``convffn.conv.bn``, the blocks' ``layer_scale``,
``layer_scale_1``/``layer_scale_2``, the attention pre-norm ``norm``, ``qkv``,
``proj``, ``conv_exp.se.*`` and ``head.*``.

Our model keeps its train-time structure; :func:`fused_to_train_state_dict`
sets its branches so that it computes exactly the fused network:

* each unit's *main* conv branch (``rbr_conv.0``, ``lkb_origin``, the RepMixer
  ``mixer``'s ``rbr_conv.0``) gets the fused kernel verbatim (zero-padded
  centrally if the branch kernel were larger; in FastViT it never is), and its
  BN becomes the identity affine: ``running_mean = 0``,
  ``running_var = 1 - eps`` (stored in the buffer's dtype), ``weight = 1``,
  ``bias`` = the fused bias;
* the other branches are zeroed: ``rbr_scale`` (conv weight 0, BN weight 0,
  bias 0, mean 0, var 1), ``rbr_skip`` (BN weight 0, bias 0), ``small_conv``;
* a RepMixer's fused kernel already contains the residual identity, so its
  ``layer_scale`` becomes 1 and its ``norm`` (a BN skip) the identity BN: the
  train-time ``x + 1 * (mixer(x) - norm(x))`` is then ``conv(x) + b``;
* a RepCPE's ``pe`` gets ``W - I`` and the fused bias (``pe(x) + x = conv(x) + b``).

With a float32 buffer, ``running_var + eps`` rounds to exactly 1 in float32
arithmetic, so these BNs are exact identities (``bn(x) == x`` bit for bit).
No float32 ``running_var`` makes ``sqrt(running_var + eps)`` exactly 1 in
float64 arithmetic (``1 - eps`` is not a float32); the nearest one, stored
here, is off by 1.4e-8, so a float64 fold sees a BN scale of ``1 + 7e-9``.

``repalgebra.fuse(model)`` then folds the model back to the fused network
(:func:`load_fused` does both steps). Its float64 fold, cast to float32,
gives back each MobileOne and large-kernel kernel bit for bit (the 7e-9 is
under half a float32 ulp); a RepMixer kernel, whose identity is cancelled
through two such BNs, and a RepCPE kernel, whose ``W - I`` is rounded to
float32 once, can differ by one ulp in the centre tap. The train-time forward
equals Apple's fused forward up to float rounding (relative 1e-6 in the tests).

**A fused checkpoint cannot be un-fused.** The train-time branches it came
from are gone; the loaded model only *represents* the fused weights. Training
from it starts from the zeroed branches above (a scale branch with conv and BN
weight both 0 receives no gradient at all; re-initialize such branches if you
want them back), and train-mode BN uses batch statistics, so the identity-BN
trick holds in eval mode only.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .blocks import MobileOneBlock, RepCPE, RepMixer, ReparamLargeKernelConv
from .state_dicts import (
    StateDict,
    check_state_dict,
    detect_layout,
    is_fused_state_dict,
    read_state_dict,
    to_apple_state_dict,
)

__all__ = [
    "fused_units",
    "fused_state_dict_shapes",
    "fused_to_train_state_dict",
    "load_fused_state_dict_",
    "load_fused_checkpoint",
    "load_fused",
]

# A unit: (module path, module, Apple name of its fused conv).
Unit = Tuple[str, nn.Module, str]


def fused_units(model: nn.Module) -> List[Unit]:
    """Every unit that Apple's ``reparameterize_model`` replaces by one conv, in module order.

    Returns ``(path, module, fused_name)`` with ``fused_name`` ``"reparam_conv"``
    or ``"lkb_reparam"``. MobileOne blocks inside a :class:`RepMixer` belong to
    that RepMixer and are not listed on their own.
    """
    units: List[Unit] = []
    inside: List[str] = []  # RepMixer paths (their children are folded with them)
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, RepMixer):
            inside.append(path)
            units.append((path, m, "reparam_conv"))
        elif isinstance(m, (MobileOneBlock, RepCPE)):
            units.append((path, m, "reparam_conv"))
        elif isinstance(m, ReparamLargeKernelConv):
            units.append((path, m, "lkb_reparam"))
    if any(not path for path, _, _ in units):
        raise ValueError("pass the whole FastViT model, not a single reparameterizable unit")
    return units


def _main_conv(m: nn.Module) -> nn.Conv2d:
    """The conv whose shape the unit's fused conv has."""
    if isinstance(m, RepMixer):
        return _main_conv(m.mixer)
    if isinstance(m, MobileOneBlock):
        if m.rbr_conv is None:
            raise ValueError("a MobileOneBlock without conv branches has no fused conv of its own")
        return m.rbr_conv[0].conv
    if isinstance(m, ReparamLargeKernelConv):
        return m.lkb_origin.conv
    if isinstance(m, RepCPE):
        return m.pe
    raise TypeError(type(m).__name__)


def _replaced_prefixes(path: str, m: nn.Module) -> List[str]:
    """Key prefixes of the train-time tensors a unit's fused conv replaces."""
    if isinstance(m, (RepMixer, RepCPE)):
        return [f"{path}."]  # RepCPE keeps nothing; RepMixer drops mixer, norm and layer scale
    if isinstance(m, MobileOneBlock):
        return [f"{path}.rbr_conv.", f"{path}.rbr_scale.", f"{path}.rbr_skip."]
    return [f"{path}.lkb_origin.", f"{path}.small_conv."]


def fused_state_dict_shapes(model: nn.Module) -> Dict[str, torch.Size]:
    """Keys and shapes of the Apple-layout fused state dict that fits ``model``.

    Kept train-time keys come first in ``model.state_dict()`` order (minus the
    replaced branches), then each unit's ``reparam_conv``/``lkb_reparam``
    weight and bias.
    """
    units = fused_units(model)
    replaced = tuple(p for path, m, _ in units for p in _replaced_prefixes(path, m))
    shapes = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(replaced)}
    for path, m, name in units:
        conv = _main_conv(m)
        shapes[f"{path}.{name}.weight"] = conv.weight.shape
        shapes[f"{path}.{name}.bias"] = torch.Size([conv.out_channels])
    return shapes


def _place_kernel(kernel: torch.Tensor, shape: torch.Size, where: str) -> torch.Tensor:
    """``kernel`` zero-padded (centrally) to ``shape``; ValueError if it does not fit."""
    if kernel.shape == shape:
        return kernel.clone()
    dh, dw = shape[-2] - kernel.shape[-2], shape[-1] - kernel.shape[-1]
    if kernel.dim() != 4 or kernel.shape[:2] != shape[:2] or dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f"{where}: fused kernel {tuple(kernel.shape)} does not fit the branch {tuple(shape)}")
    return nn.functional.pad(kernel, [dw // 2, dw // 2, dh // 2, dh // 2])


def _identity_kernel(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel of ``x -> x`` for ``conv``'s shape and groups (Apple's ``id_tensor``)."""
    out, per_group, kh, kw = conv.weight.shape
    kernel = torch.zeros(out, per_group, kh, kw, dtype=torch.float64)
    for i in range(out):
        kernel[i, i % per_group, kh // 2, kw // 2] = 1.0
    return kernel


class _Writer:
    """Fills a copy of the model's state dict, one unit at a time."""

    def __init__(self, model: nn.Module) -> None:
        self.out: StateDict = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def set(self, key: str, value: Union[torch.Tensor, float]) -> None:
        ref = self.out[key]
        if isinstance(value, torch.Tensor):
            self.out[key] = value.detach().to(dtype=ref.dtype, device=ref.device).reshape(ref.shape).clone()
        else:
            self.out[key] = torch.full_like(ref, value)

    def conv(self, prefix: str, weight: Union[torch.Tensor, float], bias=None) -> None:
        self.set(f"{prefix}.weight", weight)
        if f"{prefix}.bias" in self.out:
            self.set(f"{prefix}.bias", 0.0 if bias is None else bias)

    def identity_bn(self, prefix: str, bn: nn.BatchNorm2d, bias: Union[torch.Tensor, float] = 0.0) -> None:
        """``bn(x) = x + bias`` in eval mode: mean 0, var ``1 - eps``, weight 1."""
        self.set(f"{prefix}.running_mean", 0.0)
        self.set(f"{prefix}.running_var", 1.0 - bn.eps)
        self.set(f"{prefix}.weight", 1.0)
        self.set(f"{prefix}.bias", bias)

    def zero_bn(self, prefix: str) -> None:
        """``bn(x) = 0``: weight 0, bias 0 (mean 0, var 1)."""
        self.set(f"{prefix}.running_mean", 0.0)
        self.set(f"{prefix}.running_var", 1.0)
        self.set(f"{prefix}.weight", 0.0)
        self.set(f"{prefix}.bias", 0.0)

    def zero_branch(self, prefix: str) -> None:
        self.conv(f"{prefix}.conv", 0.0)
        self.zero_bn(f"{prefix}.bn")

    def mobileone(
        self,
        path: str,
        m: MobileOneBlock,
        kernel: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
    ) -> None:
        """Main conv branch = (kernel, bias), other branches zero.

        ``kernel=None`` (RepMixer's ``norm``) makes the block the identity
        through its BN skip instead.
        """
        if m.rbr_scale is not None:
            self.zero_branch(f"{path}.rbr_scale")
        if m.rbr_conv is not None:
            for i in range(len(m.rbr_conv)):
                self.zero_branch(f"{path}.rbr_conv.{i}")
        if kernel is None:
            if m.rbr_skip is None:
                raise ValueError(f"{path}: no BN skip to carry the identity")
            self.identity_bn(f"{path}.rbr_skip", m.rbr_skip)
            return
        if m.rbr_skip is not None:
            self.zero_bn(f"{path}.rbr_skip")
        main = m.rbr_conv[0]
        self.conv(f"{path}.rbr_conv.0.conv", _place_kernel(kernel, main.conv.weight.shape, path))
        self.identity_bn(f"{path}.rbr_conv.0.bn", main.bn, bias)


def fused_to_train_state_dict(
    model: nn.Module, fused_state: Mapping[str, torch.Tensor]
) -> StateDict:
    """The train-time state dict of ``model`` that computes the network of ``fused_state``.

    Args:
        model: a FastViT model (only its structure, BN ``eps`` and dtypes are read).
        fused_state: a fused state dict in Apple's layout whose keys and shapes
            fit ``model`` (see :func:`fused_state_dict_shapes`; checked by
            :func:`load_fused_state_dict_`, not here).

    Returns:
        A complete state dict for ``model.load_state_dict``: kept tensors copied,
        each unit's branches set as described in the module docstring. It is
        *not* an un-fused checkpoint: the original branches cannot be recovered.
    """
    w = _Writer(model)
    units = fused_units(model)
    replaced = tuple(p for path, m, _ in units for p in _replaced_prefixes(path, m))
    for key, value in fused_state.items():
        if key in w.out and not key.startswith(replaced):
            w.set(key, value)
    for path, m, name in units:
        kernel, bias = fused_state[f"{path}.{name}.weight"], fused_state[f"{path}.{name}.bias"]
        if isinstance(m, MobileOneBlock):
            w.mobileone(path, m, kernel, bias)
        elif isinstance(m, RepMixer):
            # x + 1 * (mixer(x) - norm(x)) with mixer = conv(W) + b and norm = identity.
            w.mobileone(f"{path}.mixer", m.mixer, kernel, bias)
            w.mobileone(f"{path}.norm", m.norm, None, None)
            w.set(f"{path}.layer_scale", 1.0)
        elif isinstance(m, ReparamLargeKernelConv):
            w.conv(f"{path}.lkb_origin.conv", _place_kernel(kernel, m.lkb_origin.conv.weight.shape, path))
            w.identity_bn(f"{path}.lkb_origin.bn", m.lkb_origin.bn, bias)
            if m.small_conv is not None:
                w.zero_branch(f"{path}.small_conv")
        else:  # RepCPE: pe(x) + x with pe = W - I (the subtraction rounds once, in float64)
            placed = _place_kernel(kernel, m.pe.weight.shape, path)
            w.conv(f"{path}.pe", placed.double() - _identity_kernel(m.pe), bias)
    return w.out


def load_fused_state_dict_(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    path: str = "<state dict>",
    layout: str = "apple",
    origin: Optional[Mapping[str, str]] = None,
) -> nn.Module:
    """Check an Apple-layout fused ``state`` against ``model`` and load it in place.

    Args:
        model: the train-time FastViT to load into.
        state: fused state dict, already renamed to Apple's layout (timm files
            go through :func:`fastvit_models.state_dicts.to_apple_state_dict`).
        path, layout, origin: only for error messages (file, its layout, and
            for renamed keys the file's own key).

    Returns:
        ``model``, computing the fused network (see the module docstring).

    Raises:
        ValueError: missing or unexpected keys (listed; ``num_batches_tracked``
            tolerated either way) or shapes that do not fit.
    """
    check_state_dict(
        state,
        fused_state_dict_shapes(model),
        model,
        path=path,
        layout=layout,
        origin=origin or {},
        kind="fused",
    )
    model.load_state_dict(fused_to_train_state_dict(model, state))
    return model


def load_fused_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a fused checkpoint file (Apple or timm layout) into ``model`` in place.

    Same file formats as :func:`fastvit_models.checkpoint.load_checkpoint`,
    which calls this for fused files; this one refuses train-time files.

    Raises:
        ValueError: not a fused checkpoint, or keys/shapes that do not fit.
    """
    path = os.fspath(path)
    file_state = read_state_dict(path)
    if not is_fused_state_dict(file_state):
        raise ValueError(f"{path}: not a fused checkpoint (no reparam_conv / lkb_reparam keys)")
    layout = detect_layout(file_state)
    state, origin = to_apple_state_dict(file_state, model)
    return load_fused_state_dict_(model, state, path=path, layout=layout, origin=origin)


def load_fused(
    name: str,
    checkpoint: Union[str, os.PathLike],
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    num_classes: int = 1000,
) -> nn.Module:
    """Build ``name``, load ``checkpoint`` and return ``repalgebra.fuse`` of it.

    Args:
        name: a FastViT variant (see :func:`fastvit_models.list_models`).
        checkpoint: a fused checkpoint (Apple or timm layout), or a train-time one.
        example_inputs: passed to :func:`repalgebra.fuse` (shapes only; inferred
            when ``None``).
        num_classes: classifier outputs; must match the checkpoint's head.

    Returns:
        The fused module (a ``torch.fx.GraphModule`` in eval mode, with
        ``fuse_report``). For a fused checkpoint it computes Apple's fused
        network; its weights cannot be turned back into train-time branches.

    Raises:
        ValueError: as :func:`fastvit_models.create_model`.
    """
    import repalgebra

    from . import create_model

    model = create_model(name, num_classes=num_classes, checkpoint=checkpoint)
    return repalgebra.fuse(model, example_inputs)
