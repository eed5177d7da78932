"""Adaptation strategies: the transfer-learning techniques, each a way to decide what trains and how fast.

Every strategy turns a source `Classifier` into an `Adaptation`: the model to train, optimizer parameter
groups (one per stage, so learning rates can differ by depth), and an epoch hook that (un)freezes stages.
All groups are given to the optimizer from the start; a frozen parameter has no gradient, so the
optimizer skips it, and unfreezing is just `requires_grad_(True)`: no optimizer rebuild, no lost state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from models.classifier import Classifier, count_parameters, stage_parameters

STRATEGIES = ("feature-extraction", "finetune", "gradual-unfreeze", "lora", "scratch")
LORA_TARGETS = ("head", "late", "half", "all")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass
class AdaptConfig:
    """How to adapt; every field has a default that works on the embedded digits task."""

    strategy: str = field(default="lora", metadata={"help": f"one of {', '.join(STRATEGIES)}"})
    lr_head: float = field(default=1e-3, metadata={"help": "learning rate of the new head"})
    lr_backbone_max: float = field(default=1e-4, metadata={"help": "rate of the last (output-side) stage"})
    lr_backbone_min: float = field(default=1e-5, metadata={"help": "rate of the first stage; geometric between"})
    freeze_stages: int = field(default=2, metadata={"help": "finetune: number of input-side stages kept frozen"})
    full_unfreeze_epochs: int = field(default=0, metadata={"help": "finetune: last N epochs train every stage"})
    full_unfreeze_lr: float = field(default=1e-5, metadata={"help": "finetune: rate of the stages unfrozen last"})
    unfreeze_every: int = field(default=1, metadata={"help": "gradual-unfreeze: epochs between stage unfreezes"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})
    lora_targets: str = field(default="all", metadata={"help": f"LoRA depth policy: {', '.join(LORA_TARGETS)}"})
    lora_lr: float = field(default=5e-3, metadata={"help": "learning rate of the LoRA matrices"})
    lora_norms: bool = field(
        default=True, metadata={"help": "adapters own the norm layers of the stages they adapt (per-domain stats)"}
    )
    scratch_lr: float = field(default=1e-3, metadata={"help": "scratch: one rate for every layer"})
    head_dropout: float = field(default=0.0, metadata={"help": "dropout before the new head's linear layer"})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(
                f"unknown LoRA target policy {self.lora_targets!r}; choose one of {', '.join(LORA_TARGETS)}"
            )
        if self.lora_r < 1 or self.unfreeze_every < 1 or self.freeze_stages < 0:
            raise ValueError("lora_r and unfreeze_every must be >= 1 and freeze_stages >= 0")
        if not 0 < self.lr_backbone_min <= self.lr_backbone_max:
            raise ValueError("need 0 < lr_backbone_min <= lr_backbone_max (discriminative rates grow with depth)")


@dataclass
class Adaptation:
    model: nn.Module
    param_groups: list[dict]
    strategy: str
    on_epoch: Callable[[int, int], str | None] = field(default=lambda epoch, total: None)
    notes: dict = field(default_factory=dict)

    def trainable(self) -> tuple[int, int]:
        return count_parameters(self.model)


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
    from models.lora import lora

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
