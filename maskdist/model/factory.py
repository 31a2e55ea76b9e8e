"""The timm model factory: architecture, 18-way head, pretrained weights from a local file.

The file (``.safetensors``, ``.pth`` or ``.bin`` of the timm architecture) is a local one, or
the one :mod:`maskdist.model.weights` resolved in the Hugging Face cache. The classifier of the file is dropped and a new 18-way
linear head is initialised Kaiming-uniform with a zero bias; nothing follows the logits.
With ``heads="parts"`` the classifier is replaced in place by :class:`maskdist.model.heads.PartHeads`
(8 part logits), so the timm model keeps its type, config and dropout before the head, and
``create_model(architecture, heads=...)`` rebuilds either kind from a model card.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import timm
import torch
from torch import nn

from maskdist.data.labels import NUM_CLASSES
from maskdist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from maskdist.errors import MaskdistError
from maskdist.model import architectures
from maskdist.model.heads import PartHeads, check_heads, init_linear


def create_model(
    name: str = "efficientnet_b3",
    num_classes: int = NUM_CLASSES,
    drop_rate: float = 0.4,
    pretrained_file: str | Path | None = None,
    warn_random: bool = True,  # warnings about the configuration (random weights, inert drop-path)
    drop_path_rate: float = 0.0,
    heads: str = "single",
) -> nn.Module:
    """A timm model with a fresh ``num_classes``-way head, or fresh part heads (``heads="parts"``).

    ``drop_rate`` is dropout on the pooled features before the head(s); ``drop_path_rate``
    is timm's stochastic depth (its largest rate: timm scales it down for earlier blocks).
    """
    architectures.check(name)
    if not 0.0 <= drop_rate < 1.0:
        raise MaskdistError(f"drop rate {drop_rate} must be in [0, 1)")
    if not 0.0 <= drop_path_rate < 1.0:
        raise MaskdistError(f"drop-path rate {drop_path_rate} must be in [0, 1)")
    if check_heads(heads) == "parts" and num_classes != NUM_CLASSES:
        raise MaskdistError(f"part heads predict the {NUM_CLASSES} classes, not {num_classes}: leave num_classes at {NUM_CLASSES}")
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:  # only when asked: not every timm architecture takes the argument
        kwargs["drop_path_rate"] = drop_path_rate
    source = dict(pretrained=False)
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise MaskdistError(f"pretrained weights {path} not found: pass a local .safetensors/.pth file of {name}, or hub")
        source = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    elif warn_random:
        warnings.warn(
            f"{name} starts from random weights: scores will be poor; pass --pretrained hub (timm's ImageNet weights) or FILE",
            stacklevel=2,
        )
    try:
        # timm loads a pretrained file with weights_only torch.load or safetensors, drops the
        # classifier when the class count differs, and loads the rest.
        model = timm.create_model(name, **source, **kwargs)
    except TypeError as err:
        if "drop_path_rate" not in kwargs:
            raise
        raise MaskdistError(f"{name} does not take a drop-path rate ({err}): use drop-path rate 0 or another architecture") from None
    except (RuntimeError, KeyError, ValueError) as err:
        if pretrained_file is None:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MaskdistError(f"pretrained weights {path} do not fit {name} ({first[:200]}): pass weights of that architecture") from None
    if drop_path_rate and warn_random and not _active_drop_paths(model):
        warnings.warn(f"{name} has no residual block for stochastic depth to drop: drop-path {drop_path_rate} changes nothing "
                      "(full-size EfficientNets, ResNets and ConvNeXts have them)", stacklevel=2)
    if heads == "parts":
        _replace_classifier(model, PartHeads(_linear_head(model).in_features))
    init_head(model)
    return model


def _active_drop_paths(model: nn.Module) -> int:
    """How many DropPath layers can drop anything: timm builds one in every EfficientNet block,
    but a block without a skip connection (stride or width change) never applies it."""
    from timm.layers import DropPath

    return sum(isinstance(child, DropPath) and getattr(parent, "has_skip", True)
               for parent in model.modules() for child in parent.children())


def _linear_head(model: nn.Module) -> nn.Linear:
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise MaskdistError(f"{type(model).__name__} has a {type(head).__name__} head; maskdist expects a linear classifier")
    return head


def _replace_classifier(model: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``get_classifier()`` is, whatever the architecture names it."""
    old = model.get_classifier()
    path = next(name for name, module in model.named_modules() if module is old)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def init_head(model: nn.Module) -> None:
    """Kaiming-uniform weights and zero bias on the classifier (no activation follows it)."""
    head = model.get_classifier()
    for layer in head.layers() if isinstance(head, PartHeads) else (_linear_head(model),):
        init_linear(layer)


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's pretrained weights expect, ImageNet's by default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def prepare_for_device(model: nn.Module, device: torch.device) -> nn.Module:
    """channels_last on CUDA: convolutions run in NHWC on tensor cores, and the loaders hand
    over NHWC uint8 batches there (see :func:`maskdist.data.transforms.to_device`)."""
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def plain_module(model: nn.Module) -> nn.Module:
    """The ``nn.Module`` under DDP and ``torch.compile`` wrappers, in any order.

    It is what gets saved (no ``module.`` or ``_orig_mod.`` in the names), averaged into the
    EMA and validated (no recompilation for eval mode or a last partial batch).
    """
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


# Prefixes a wrapper adds to state-dict names: torch.compile's, and DDP's.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(state: dict) -> dict:
    """State-dict names without the prefix a wrapper added to every one of them, so weights
    saved through a wrapper (as earlier ``--compile`` runs saved their best model) load into
    a plain model."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(name.startswith(p) for name in state)), None)
        if prefix is None:
            return state
        state = {name[len(prefix):]: value for name, value in state.items()}
    return state
