"""A zoo of compact models written the way public model libraries write them.

Each entry reproduces one architecture family's *structure and Python* at small width (residual blocks,
dense concatenation, re-parameterizable branches, squeeze-excite, window attention with size-dependent
padding, shifted windows, unfold/fold, pooling attention, linear attention, in-place ops, asserts on sizes),
so ``repalgebra.fuse`` is tested on code written by other people, not by us for us.  Weights are random
(seeded), norm statistics realistic (``randomize_bn``), models in eval mode and float32; each also runs after
``.double()``.  One file per family or group of related families; each file's docstring names the public
code whose patterns it reproduces.

    from zoo import ZOO, zoo_model
    for entry in ZOO:
        model = entry.build()
        y = model(torch.randn(entry.input_shape))
"""

from __future__ import annotations

from . import (
    backbone_fpn,
    coatnet,
    convnext,
    densenet,
    deploy_forms,
    detection,
    efficientnet,
    efficientvit,
    fastvit,
    ghostnet,
    hrnet,
    inception,
    levit,
    metaformer,
    mobilevit,
    mvit,
    nfnet,
    pvt,
    reparam,
    resnet,
    segmentation,
    shiftvit,
    split_resnets,
    video,
    vit,
    vnet,
    windows,
)
from ._base import ZooModel, count_bn, fx_fused_bn_count, randomize_bn, seeded

__all__ = ["ZooModel", "ZOO", "zoo_model", "randomize_bn", "seeded", "fx_fused_bn_count", "count_bn"]

_FAMILIES = (
    resnet, split_resnets, densenet, backbone_fpn, efficientnet, ghostnet, reparam, inception, hrnet, detection, nfnet,
    segmentation, deploy_forms, convnext, fastvit, metaformer, levit, vit, windows, mobilevit, mvit, efficientvit, coatnet, pvt,
    shiftvit, video, vnet,
)

ZOO: tuple[ZooModel, ...] = tuple(e for family in _FAMILIES for e in family.ENTRIES)

_BY_NAME = {e.name: e for e in ZOO}
assert len(_BY_NAME) == len(ZOO), "zoo names must be unique"


def zoo_model(name: str) -> ZooModel:
    """The entry called ``name`` (``KeyError`` listing the known names otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None
