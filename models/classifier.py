"""A torchvision backbone with a replaceable classification head.

`Classifier` splits a catalog model into `backbone` (everything up to the penultimate features, its
original head replaced by nn.Identity) and `head` (dropout + linear). One forward pass gives both the
logits and the embedding, which the drift monitor records without running the model twice.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.catalog import BackboneSpec, build_backbone, get_spec


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def make_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


class Classifier(nn.Module):
    """backbone -> embedding -> head -> logits."""

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        old_head = _set_submodule(backbone, spec.head_path, nn.Identity())
        if not isinstance(old_head, nn.Linear):
            raise TypeError(f"{spec.name}: {spec.head_path} is {type(old_head).__name__}, expected nn.Linear")
        self.spec_name = spec.name
        self.backbone = backbone
        self.head = make_head(old_head.in_features, num_classes, dropout)

    @property
    def spec(self) -> BackboneSpec:
        return get_spec(self.spec_name)

    @property
    def num_classes(self) -> int:
        return self.head[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(x)
        return self.head(embedding), embedding

    def reset_head(self, num_classes: int, dropout: float | None = None) -> None:
        """A fresh, randomly initialised head for a new class set (the backbone is untouched)."""
        p = self.head[0].p if dropout is None else dropout
        self.head = make_head(self.head[-1].in_features, num_classes, p)


def build_classifier(
    backbone: str, num_classes: int, weights: str | Path | None = None, dropout: float = 0.0
) -> Classifier:
    spec = get_spec(backbone)
    return Classifier(spec, build_backbone(backbone, weights), num_classes, dropout)


def stage_of(param_name: str, spec: BackboneSpec, prefix: str = "backbone.") -> int | None:
    """Index of the stage a backbone parameter belongs to; None for the head.

    Parameters matching no listed stage (e.g. mobilenet's pre-head linear, convnext's final norm) sit
    just before the head, so they count as part of the last stage.
    """
    name = param_name.split("base_model.model.", 1)[-1]
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    for i, prefixes in enumerate(spec.stages):
        if any(rest == p or rest.startswith(p + ".") for p in prefixes):
            return i
    return len(spec.stages) - 1


def stage_parameters(model: Classifier) -> list[list[nn.Parameter]]:
    """Backbone parameters grouped by stage, input side first."""
    spec = model.spec
    groups: list[list[nn.Parameter]] = [[] for _ in spec.stages]
    for name, param in model.backbone.named_parameters(prefix="backbone"):
        groups[stage_of(name, spec)].append(param)
    return groups


def freeze_batchnorm_of_frozen(model: nn.Module) -> None:
    """Put every norm layer whose parameters are all frozen into eval mode.

    A frozen layer must not keep updating its running statistics either: that would silently change the
    shared base model (and, for LoRA, every other adapter served on it).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
