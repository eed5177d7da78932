"""What an adaptation is: the configuration that chooses a strategy (`AdaptConfig`) and what a strategy hands the
training loop (`Adaptation`).

Its own module so that models/strategies.py (which dispatches to every strategy) and models/lora.py (the LoRA
strategy) both build on it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from models.classifier import count_parameters

STRATEGIES = ("feature-extraction", "finetune", "gradual-unfreeze", "lora", "scratch")
LORA_TARGETS = ("head", "late", "half", "all")


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
    """What a strategy returns: the model to train, its optimizer groups, and the hook that (un)freezes per epoch."""

    model: nn.Module
    param_groups: list[dict]
    strategy: str
    on_epoch: Callable[[int, int], str | None] = field(default=lambda epoch, total: None)
    notes: dict = field(default_factory=dict)

    def trainable(self) -> tuple[int, int]:
        return count_parameters(self.model)
