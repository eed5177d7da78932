"""Adaptation strategies: the transfer-learning techniques, each a way to decide what trains and how fast.

Every strategy turns a source `Classifier` into an `Adaptation`: the model to train, optimizer parameter
groups (one per stage, so learning rates can differ by depth), and an epoch hook that (un)freezes stages.
All groups are given to the optimizer from the start; a frozen parameter has no gradient, so the
optimizer skips it, and unfreezing is just `requires_grad_(True)`: no optimizer rebuild, no lost state.
"""

from __future__ import annotations

import copy

from torch import nn

from models.adaptation import LORA_TARGETS, STRATEGIES, Adaptation, AdaptConfig
from models.classifier import Classifier, stage_parameters
from models.lora import lora

# AdaptConfig, Adaptation and the names they accept live in models.adaptation; importers reach them here too.
__all__ = [
    "LORA_TARGETS", "STRATEGIES", "AdaptConfig", "Adaptation", "adapt", "feature_extraction", "finetune",
    "gradual_unfreeze", "scratch", "stage_lrs",
]


def stage_lrs(n: int, lo: float, hi: float) -> list[float]:
    """Discriminative rates: geometric from `lo` at the input stage to `hi` at the last stage."""
    if n == 1:
        return [hi]
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _set_trainable(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _staged(model: Classifier, lrs: list[float], lr_head: float) -> list[dict]:
    stages = stage_parameters(model)
    named = enumerate(zip(stages, lrs, strict=True))
    groups = [{"params": ps, "lr": lr, "name": f"stage{i}"} for i, (ps, lr) in named]
    return groups + [{"params": list(model.head.parameters()), "lr": lr_head, "name": "head"}]


def feature_extraction(model: Classifier, cfg: AdaptConfig) -> Adaptation:
    model.backbone.requires_grad_(False)
    return Adaptation(
        model, [{"params": list(model.head.parameters()), "lr": cfg.lr_head, "name": "head"}], "feature-extraction"
    )


def finetune(model: Classifier, cfg: AdaptConfig) -> Adaptation:
    stages = stage_parameters(model)
    k = min(cfg.freeze_stages, len(stages) - 1)
    lrs = [cfg.full_unfreeze_lr] * k + stage_lrs(len(stages) - k, cfg.lr_backbone_min, cfg.lr_backbone_max)
    for i, ps in enumerate(stages):
        _set_trainable(ps, i >= k)

    def on_epoch(epoch: int, total: int) -> str | None:
        if cfg.full_unfreeze_epochs and epoch == max(total - cfg.full_unfreeze_epochs, 0) and k:
            _set_trainable([p for ps in stages[:k] for p in ps], True)
            return f"unfroze stages 0..{k - 1} at lr {cfg.full_unfreeze_lr:g}"
        return None

    return Adaptation(model, _staged(model, lrs, cfg.lr_head), "finetune", on_epoch, {"frozen_stages": k})


def gradual_unfreeze(model: Classifier, cfg: AdaptConfig) -> Adaptation:
    stages = stage_parameters(model)
    lrs = stage_lrs(len(stages), cfg.lr_backbone_min, cfg.lr_backbone_max)
    model.backbone.requires_grad_(False)
    unfrozen = 0

    def on_epoch(epoch: int, total: int) -> str | None:
        nonlocal unfrozen
        want = min(epoch // cfg.unfreeze_every, len(stages))
        if want == unfrozen:
            return None
        for ps in stages[len(stages) - want :]:
            _set_trainable(ps, True)
        unfrozen = want
        return f"unfroze the last {want} stage(s)"

    return Adaptation(model, _staged(model, lrs, cfg.lr_head), "gradual-unfreeze", on_epoch)


def scratch(model: Classifier, cfg: AdaptConfig) -> Adaptation:
    """The baseline transfer must beat: the same architecture, randomly initialised, all layers trained."""
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters") and module is not fresh:
            module.reset_parameters()
    fresh.requires_grad_(True)
    return Adaptation(fresh, [{"params": list(fresh.parameters()), "lr": cfg.scratch_lr, "name": "all"}], "scratch")


def adapt(model: Classifier, cfg: AdaptConfig, num_classes: int, keep_head: bool = False) -> Adaptation:
    """Prepare `model` for `cfg.strategy`: in place, except scratch (a fresh copy) and lora (wrapped by peft).

    Every strategy trains a fresh head unless `keep_head` (same class set: start from the source head).
    """
    if keep_head and num_classes != model.num_classes:
        raise ValueError(f"keep_head needs the source's {model.num_classes} classes, the target has {num_classes}")
    model.requires_grad_(True)
    model.head[0].p = cfg.head_dropout
    if cfg.strategy == "lora":
        return lora(model, cfg, num_classes, keep_head)
    if not keep_head:
        model.reset_head(num_classes, cfg.head_dropout)
    build = {
        "feature-extraction": feature_extraction,
        "finetune": finetune,
        "gradual-unfreeze": gradual_unfreeze,
        "scratch": scratch,
    }[cfg.strategy]
    return build(model, cfg)
