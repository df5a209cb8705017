"""Which parameters of a classifier train: all, none of the encoder, or its top layers."""

from __future__ import annotations

from typing import Optional

from torch import nn

from twilbert.model.backbone import HFClassifier


def encoder_of(model: nn.Module) -> nn.Module:
    """The pretrained part of a classifier (what ``finetune_all: false`` freezes)."""
    return model.backbone if isinstance(model, HFClassifier) else model.twilbert


def modules_at_depth(model: nn.Module) -> list[list[nn.Module]]:
    """For each layer depth, bottom first, the modules applied there.

    Under TWilBert's cross-sharing every depth holds the same layer object (plus its own PKM
    memory, if any), so training the top k depths trains the shared layer for k >= 1.
    """
    if isinstance(model, HFClassifier):
        layers = getattr(getattr(model.backbone, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"finetuning.trainable_layers: cannot find the layer stack of {type(model.backbone).__name__} "
                "(expected encoder.layer); use finetune_all instead"
            )
        return [[layer] for layer in layers]
    stack = model.twilbert.encoder
    return [
        [stack.layer_at(i), *([stack.memories[str(i)]] if str(i) in stack.memories else [])]
        for i in range(stack.n_encoders)
    ]


def set_trainable(model: nn.Module, finetune_all: bool, trainable_layers: Optional[int]) -> None:
    """Freeze the encoder (``finetune_all`` false), or all but its top ``trainable_layers`` depths."""
    encoder = encoder_of(model)
    if not finetune_all:
        encoder.requires_grad_(False)
        return
    if trainable_layers is None:
        return
    depths = modules_at_depth(model)
    encoder.requires_grad_(False)
    for modules in depths[len(depths) - min(trainable_layers, len(depths)) :]:
        for module in modules:
            module.requires_grad_(True)
