"""FastViT state dicts: Apple's and timm's key layouts, reading checkpoint files, checking keys and shapes.

Our module paths follow Apple's reference (``apple/ml-fastvit``), so an Apple
train-time state dict maps onto our model unchanged. timm's port
(``timm/models/fastvit.py``) renames modules and regroups the flat ``network``
list into stages; :func:`apple_key_to_timm` and :func:`timm_key_to_apple` map
single keys between the two layouts given the model's network layout.

Supported files: ``.pth`` / ``.pth.tar`` (a bare state dict, or one wrapped in
``{"state_dict": ...}`` or ``{"model": ...}``; a DDP ``module.`` prefix is
stripped) and ``.safetensors``. Files are read with
``torch.load(..., weights_only=True)`` or ``safetensors.torch.load_file``;
nothing is downloaded.

Fused (reparameterized) state dicts, as written after Apple's or timm's
``reparameterize_model`` (``reparam_conv`` / ``lkb_reparam`` keys), are
recognised by :func:`is_fused_state_dict`. Both loaders build on this module:
:mod:`fastvit_models.checkpoint` (any checkpoint) and
:mod:`fastvit_models.fused_checkpoint` (fused ones).
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, List, Mapping, Tuple, Union

import torch
import torch.nn as nn

from .blocks import PatchEmbed, RepCPE

__all__ = [
    "StateDict",
    "NetworkLayout",
    "network_layout",
    "is_fused_state_dict",
    "apple_key_to_timm",
    "timm_key_to_apple",
    "to_timm_state_dict",
    "read_state_dict",
    "detect_layout",
    "to_apple_state_dict",
    "check_state_dict",
]

StateDict = Dict[str, torch.Tensor]
# One entry per element of ``model.network``: (stage index, role), where role is
# "blocks", "downsample" (PatchEmbed) or "pos_emb" (RepCPE).
NetworkLayout = List[Tuple[int, str]]

# Module names that differ between the layouts, wherever they appear in a key.
_APPLE_TO_TIMM_PARTS = {
    "rbr_conv": "conv_kxk",
    "rbr_scale": "conv_scale",
    "rbr_skip": "identity",
    "lkb_origin": "large_conv",
    "convffn": "mlp",
}
_TIMM_TO_APPLE_PARTS = {v: k for k, v in _APPLE_TO_TIMM_PARTS.items()}
# SE convs, renamed only right after an ``se`` module.
_SE_APPLE_TO_TIMM = {"reduce": "fc1", "expand": "fc2"}
_SE_TIMM_TO_APPLE = {v: k for k, v in _SE_APPLE_TO_TIMM.items()}
# Layer scales: Apple stores bare parameters, timm a ``LayerScale2d`` with ``gamma``.
_LAYER_SCALES = ("layer_scale", "layer_scale_1", "layer_scale_2")
# Keys that exist only in fused (reparameterized) checkpoints. Apple names the
# large-kernel conv's fused conv ``lkb_reparam``; timm calls it ``reparam_conv``
# like every other fused conv.
_FUSED_MARKERS = ("reparam_conv", "lkb_reparam")


def network_layout(model: nn.Module) -> NetworkLayout:
    """Return ``(stage, role)`` for each element of ``model.network`` (Apple's flat list).

    A ``PatchEmbed`` opens a new stage (timm calls it ``stages.S.downsample``);
    a ``RepCPE`` becomes ``stages.S.pos_emb``; block sequences ``stages.S.blocks``.
    """
    layout: NetworkLayout = []
    stage = 0
    for module in model.network:
        if isinstance(module, PatchEmbed):
            stage += 1
            layout.append((stage, "downsample"))
        elif isinstance(module, RepCPE):
            layout.append((stage, "pos_emb"))
        else:
            layout.append((stage, "blocks"))
    return layout


def _rename_parts(parts: List[str], table: Mapping[str, str], se_table: Mapping[str, str]) -> List[str]:
    """Rename module names in a dotted key, SE children only after ``se``."""
    out = []
    for i, p in enumerate(parts):
        if i > 0 and parts[i - 1] == "se" and p in se_table:
            out.append(se_table[p])
        else:
            out.append(table.get(p, p))
    return out


def apple_key_to_timm(key: str, layout: NetworkLayout) -> str:
    """Map one Apple-layout key (our model's key) to timm's layout.

    Examples (t8 layout)::

        patch_embed.0.rbr_conv.0.conv.weight  -> stem.0.conv_kxk.0.conv.weight
        network.1.proj.0.lkb_origin.bn.bias   -> stages.1.downsample.proj.0.large_conv.bn.bias
        network.2.0.token_mixer.layer_scale   -> stages.1.blocks.0.token_mixer.layer_scale.gamma
        conv_exp.se.reduce.weight             -> final_conv.se.fc1.weight
        head.weight                           -> head.fc.weight

    Fused keys (sa12 layout)::

        network.1.proj.0.lkb_reparam.weight   -> stages.1.downsample.proj.0.reparam_conv.weight
        network.6.reparam_conv.bias           -> stages.3.pos_emb.reparam_conv.bias
    """
    parts = key.split(".")
    head: List[str]
    if parts[0] == "patch_embed":
        head, rest = ["stem"], parts[1:]
    elif parts[0] == "conv_exp":
        head, rest = ["final_conv"], parts[1:]
    elif parts[0] == "head":
        head, rest = ["head", "fc"], parts[1:]
    elif parts[0] == "network":
        stage, role = layout[int(parts[1])]
        rest = parts[2:]
        if role == "downsample":
            head = ["stages", str(stage), "downsample"]  # rest starts with "proj"
        elif role == "pos_emb":
            if rest[0] == "pe":
                head, rest = ["stages", str(stage), "pos_emb", "pos_enc"], rest[1:]
            elif rest[0] == "reparam_conv":  # fused RepCPE: same name in both layouts
                head = ["stages", str(stage), "pos_emb"]
            else:
                raise KeyError(key)
        else:
            head = ["stages", str(stage), "blocks"]
    else:
        raise KeyError(f"not a FastViT key in Apple layout: {key!r}")
    rest = _rename_parts(rest, _APPLE_TO_TIMM_PARTS, _SE_APPLE_TO_TIMM)
    # Fused large-kernel conv: Apple's ``lkb_reparam`` is timm's ``reparam_conv``.
    rest = ["reparam_conv" if p == "lkb_reparam" else p for p in rest]
    if rest and rest[-1] in _LAYER_SCALES:
        rest = rest + ["gamma"]
    return ".".join(head + rest)


def timm_key_to_apple(key: str, layout: NetworkLayout) -> str:
    """Map one timm-layout key to Apple's layout (the inverse of :func:`apple_key_to_timm`)."""
    parts = key.split(".")
    head: List[str]
    if parts[0] == "stem":
        head, rest = ["patch_embed"], parts[1:]
    elif parts[0] == "final_conv":
        head, rest = ["conv_exp"], parts[1:]
    elif parts[:2] == ["head", "fc"]:
        head, rest = ["head"], parts[2:]
    elif parts[0] == "stages" and len(parts) > 3:
        stage, group = int(parts[1]), parts[2]
        role = {"downsample": "downsample", "pos_emb": "pos_emb", "blocks": "blocks"}.get(group)
        if role is None or (stage, role) not in layout:
            raise KeyError(f"no network element for {key!r}")
        index = layout.index((stage, role))
        rest = parts[3:]
        if role == "pos_emb":
            if rest[0] == "pos_enc":
                rest = ["pe"] + rest[1:]
            elif rest[0] != "reparam_conv":  # fused RepCPE keeps its name
                raise KeyError(key)
        elif role == "downsample" and rest[:3] == ["proj", "0", "reparam_conv"]:
            # The fused large-kernel conv: timm's ``reparam_conv``, Apple's ``lkb_reparam``.
            rest = ["proj", "0", "lkb_reparam"] + rest[3:]
        head = ["network", str(index)]
    else:
        raise KeyError(f"not a FastViT key in timm layout: {key!r}")
    if len(rest) >= 2 and rest[-1] == "gamma" and rest[-2] in _LAYER_SCALES:
        rest = rest[:-1]
    rest = _rename_parts(rest, _TIMM_TO_APPLE_PARTS, _SE_TIMM_TO_APPLE)
    return ".".join(head + rest)


def to_timm_state_dict(model: nn.Module) -> StateDict:
    """Return ``model.state_dict()`` with every key in timm's layout."""
    layout = network_layout(model)
    return {apple_key_to_timm(k, layout): v for k, v in model.state_dict().items()}


def read_state_dict(path: Union[str, os.PathLike]) -> StateDict:
    """Read a state dict from ``.pth``/``.pth.tar``/``.safetensors`` and unwrap it.

    Accepts ``{"state_dict": sd}`` and ``{"model": sd}`` wrappers and strips a
    ``module.`` prefix present on every key (DDP checkpoints).
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(path, device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "unsupported global" not in str(err).lower():  # not a pickle of objects: not a pickle at all
                raise ValueError(f"{path}: not a PyTorch checkpoint (.pth, .pth.tar) nor safetensors file: torch.load "
                                 f"fails with {type(err).__name__}: {err}") from err
            # e.g. training checkpoints that also pickle an argparse.Namespace.
            raise ValueError(
                f"{path}: holds objects other than tensors and plain containers, which "
                "torch.load(weights_only=True) refuses to unpickle; re-save just the "
                "state dict (torch.save(ckpt['state_dict'], ...)) from a trusted copy"
            ) from err
        except (RuntimeError, KeyError, EOFError, OSError) as err:  # not a file torch.save wrote (torch raises a bare KeyError)
            raise ValueError(f"{path}: not a PyTorch checkpoint (.pth, .pth.tar) nor safetensors file: torch.load "
                             f"fails with {type(err).__name__}: {err}") from err
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def is_fused_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """True if ``state`` holds fused convs (a ``reparam_conv`` or ``lkb_reparam`` module).

    Such state dicts come from Apple's or timm's ``reparameterize_model``;
    :mod:`fastvit_models.fused_checkpoint` loads them.
    """
    return any(marker in k.split(".") for k in state for marker in _FUSED_MARKERS)


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """Return ``"apple"`` or ``"timm"`` for a FastViT state dict, train-time or fused.

    Raises:
        ValueError: when neither layout's top-level names are present.
    """
    tops = {k.split(".", 1)[0] for k in state}
    if tops & {"patch_embed", "network", "conv_exp"}:
        return "apple"
    if tops & {"stem", "stages", "final_conv"}:
        return "timm"
    raise ValueError(
        "cannot tell the checkpoint's layout: expected Apple keys (patch_embed.*, network.*) "
        f"or timm keys (stem.*, stages.*); top-level names: {sorted(tops)}"
    )


def to_apple_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> Tuple[StateDict, Dict[str, str]]:
    """Rename ``state`` (Apple or timm layout, detected) to our model's (Apple) keys.

    Returns:
        ``(renamed, origin)``: the renamed state dict and, for each renamed key
        whose file key differs, that file key (for error messages). timm keys
        that fit no part of ``model``'s structure are kept under their own name,
        so the key check reports them as unexpected.
    """
    if detect_layout(state) == "apple":
        return dict(state), {}
    layout = network_layout(model)
    out: StateDict = {}
    origin: Dict[str, str] = {}
    for k, v in state.items():
        try:
            ours = timm_key_to_apple(k, layout)
        except KeyError:
            ours = k
        out[ours] = v
        if ours != k:
            origin[ours] = k
    return out, origin


def _is_counter(key: str) -> bool:
    """BN ``num_batches_tracked`` buffers, tolerated whether present or not."""
    return key.endswith("num_batches_tracked")


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    model: nn.Module,
    *,
    path: str,
    layout: str,
    origin: Mapping[str, str],
    kind: str = "",
) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly the keys and shapes of ``expected``.

    ``num_batches_tracked`` keys may be absent or extra. For timm files each
    key is shown with the file's own name in parentheses (``origin`` for keys
    the file has, :func:`apple_key_to_timm` for keys it lacks).
    """
    net = network_layout(model) if layout == "timm" else None

    def show(key: str) -> str:
        theirs = origin.get(key)
        if theirs is None and net is not None and key in expected:
            try:
                theirs = apple_key_to_timm(key, net)
            except KeyError:
                theirs = None
        return f"{key} ({layout}: {theirs})" if theirs and theirs != key else key

    missing = sorted(k for k in expected if k not in state and not _is_counter(k))
    unexpected = sorted(k for k in state if k not in expected and not _is_counter(k))
    if missing or unexpected:
        raise ValueError(
            f"{path} ({layout} layout{', ' + kind if kind else ''}) does not fit "
            f"{type(model).__name__}: "
            f"missing keys {[show(k) for k in missing]}; "
            f"unexpected keys {[show(k) for k in unexpected]}"
        )
    bad_shapes = [
        f"{show(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k]
    ]
    if bad_shapes:
        raise ValueError(f"{path}: shape mismatch: " + "; ".join(bad_shapes))
