"""The shared training loop: every strategy trains through `fit`.

Read top to bottom: build optimizer and schedule from the strategy's parameter groups, then per epoch let
the strategy (un)freeze, train, validate, keep the best weights, stop early when validation loss stalls.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from models.classifier import freeze_batchnorm_of_frozen
from models.strategies import Adaptation


@dataclass
class TrainConfig:
    """The shared loop's recipe. The defaults are `adaptserve train`'s (its options take them from here), tuned on
    the embedded digits task with few target labels."""

    epochs: int = field(default=15, metadata={"help": "maximum epochs"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd (momentum 0.9, nesterov)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "decoupled weight decay (adamw) / L2 (sgd)"})
    schedule: str = field(default="cosine", metadata={"help": "cosine or plateau (x0.3 after 2 flat epochs)"})
    warmup_epochs: float = field(default=0.5, metadata={"help": "linear warm-up length, epochs (fractions ok)"})
    patience: int = field(default=4, metadata={"help": "early stop after this many epochs without val-loss gain"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cross-entropy label smoothing"})
    seed: int = field(default=0, metadata={"help": "seeds python, numpy, torch and the data order"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda"})

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError(f"schedule must be cosine or plateau, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    seconds: float
    trainable_params: int
    total_params: int


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step warm-up then cosine; or per-step warm-up with plateau steps taken at epoch ends."""
    warm = max(int(cfg.warmup_epochs * steps_per_epoch), 1)
    total = max(cfg.epochs * steps_per_epoch, warm + 1)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warm)
    if cfg.schedule == "plateau":
        return warmup, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warm, eta_min=0.0)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[warm]), None


def train_one_epoch(model, loader, optimizer, step_scheduler, loss_fn, device) -> tuple[float, float]:
    model.train()
    freeze_batchnorm_of_frozen(model)
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_scheduler.step()
        # .item() is a device sync point; once per step is cheap next to the forward/backward pass.
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return total_loss / seen, correct / seen


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device) -> tuple[float, float]:
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += loss_fn(logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return total_loss / seen, correct / seen


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of all weights and buffers (norm statistics). Whole-model: gradual unfreezing changes which
    parameters train, so a copy of only the currently trainable ones would not restore an earlier epoch."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(adaptation: Adaptation, train: Dataset, val: Dataset, cfg: TrainConfig, progress=None) -> FitResult:
    """Train `adaptation.model` in place; on return it holds the weights of the best validation epoch."""
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    model = adaptation.model.to(device)
    train_loader = DataLoader(
        train, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=len(train) > cfg.batch_size
    )
    val_loader = DataLoader(val, batch_size=256)
    optimizer = make_optimizer(adaptation.param_groups, cfg)
    step_scheduler, plateau = make_scheduler(optimizer, cfg, len(train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    best_loss, best_epoch, best_state, history, max_trainable = float("inf"), -1, None, [], 0
    task = progress.add_task(adaptation.strategy, total=cfg.epochs) if progress else None
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        event = adaptation.on_epoch(epoch, cfg.epochs)
        max_trainable = max(max_trainable, adaptation.trainable()[0])
        train_loss, train_acc = train_one_epoch(model, train_loader, optimizer, step_scheduler, loss_fn, device)
        val_loss, val_acc = validate(model, val_loader, loss_fn, device)
        if plateau is not None:
            plateau.step(val_loss)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "event": event,
            }
        )
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, best_state = val_loss, epoch, _snapshot(model)
        if progress:
            progress.update(task, advance=1, description=f"{adaptation.strategy} ep{epoch} val_acc={val_acc:.3f}")
        if epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(history, best_epoch, time.perf_counter() - start, max_trainable, adaptation.trainable()[1])
