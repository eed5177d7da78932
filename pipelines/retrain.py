"""Re-fine-tuning an adapter on its new labels, and the champion / challenger gate that decides promotion.

A job, top to bottom:
1. the adapter's labels (`LabelStore`): the train split trains, the holdout split (never trained on by any
   version, since the split is a fixed hash of each example) is the target half of the gate. By default
   (`holdout_trust="trusted"`) the holdout holds only trusted labels (`adaptserve data add`, a trusted-labeller or
   admin token): open feedback whose hash says holdout is trained on instead, and examples whose labels conflict
   are left out of both;
2. a replay sample of the base model's source training data (`samples/replay.npz`) is mixed into training,
   `replay_ratio` images per label, so the new version does not forget the source domain;
3. the challenger starts from the champion's LoRA weights (same rank and targets; they are the champion's
   structure), or from a fresh LoRA on the base when the adapter has no champion yet;
4. champion and challenger are evaluated on the target holdout and on the base's source holdout
   (`samples/holdout.npz`, never trained on); the challenger is promoted only if it beats the champion on the
   target holdout by at least `margin` points AND loses at most `max_source_drop` points on the source holdout;
5. a passing challenger is published (verified ONNX, registry version, promotion: a hot swap in running
   services; `registry.rollback` stays possible). A rejected one is not registered; the result has the numbers.

What the gate protects against, and what not: untrusted labels may train a challenger but never grade it, so a
poisoned challenger (relabelled feedback, e.g. every "3" sent as "4") is rejected when it loses accuracy on the
trusted target holdout or on the source holdout. It cannot see poison in a region the trusted holdout does not
cover (a class, a camera's look, a kind of image no trusted label shows), nor poison sent with a token that is
trusted. `holdout_trust="any"` grades challengers on open feedback too: then a feedback stream can promote its
own poison (measured: 1,200 inverted digits relabelled (true + 1) % 10 by an unauthenticated client promoted a v2
that had learnt them; its source accuracy stayed 0.99, so the source check could not see it).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from models import paths, settings
from models.artifacts import load_adapter_model, load_model, save_adapter
from models.metadata import AdapterMeta, ModelMeta
from models.preprocessing import parse_augment
from models.registry import AdapterNotFoundError, AdapterVersion, open_registry
from models.samples import find_samples, load_samples, sample_path, save_image_set
from models.strategies import LORA_TARGETS, Adaptation, AdaptConfig, adapt
from pipelines.data import ImageSet
from pipelines.evaluate import Metrics, evaluate
from pipelines.gate import gate
from pipelines.label_trust import Trust
from pipelines.labels import LabelSplit, LabelStore
from pipelines.release import publish
from pipelines.train import TrainConfig, fit, resolve_device, seed_everything

Progress = Callable[[float, str], None]
HOLDOUT_TRUST: dict[str, Trust | None] = {"trusted": Trust.TRUSTED, "any": None}  # RetrainConfig.holdout_trust


class RetrainError(ValueError):
    """The job cannot run as asked (too few labels, missing source samples, ...); the message says what to do."""


def _setting(name: str) -> Any:
    """A RetrainConfig field that is the setting `name`: its default and help come from models.settings."""
    return field(default=settings.default(name), metadata={"help": settings.help_text(name), "setting": name})


@dataclass
class RetrainConfig:
    """How a re-fine-tuning job trains and gates; defaults are tuned on the embedded digits task (2 CPU cores)."""

    margin: float = _setting("retrain_margin")
    max_source_drop: float = _setting("retrain_max_source_drop")
    epochs: int = field(default=8, metadata={"help": "maximum training epochs"})
    lr: float = field(default=2e-3, metadata={"help": "learning rate of the LoRA matrices and adapted norm layers"})
    lr_head: float = field(default=5e-4, metadata={"help": "learning rate of the adapter's head"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    patience: int = field(default=5, metadata={"help": "early stop after this many epochs without val-loss gain"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of a fresh adapter (a champion keeps its own)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha of a fresh adapter (scale = alpha / r)"})
    lora_targets: str = field(
        default="all", metadata={"help": f"LoRA depth policy of a fresh adapter: {', '.join(LORA_TARGETS)}"}
    )
    replay_ratio: float = field(  # 1.0 let 200 labels of a strong shift forget 1.4-3.9 source points (rejected)
        default=3.0, metadata={"help": "source replay images mixed in per training label (0 = no replay)"}
    )
    min_labels: int = _setting("retrain_min_train_labels")
    min_holdout: int = _setting("retrain_min_holdout_labels")
    max_labels: int = field(
        default=5000,
        metadata={"help": "at most this many newest labels are used (decoded in memory: ~1 GB at 256 px)"},
    )
    holdout_fraction: float = field(
        default=0.3, metadata={"help": "share of labels held out for the gate (keep it fixed across jobs)"}
    )
    holdout_trust: str = _setting("retrain_holdout_trust")
    val_fraction: float = field(
        default=0.15, metadata={"help": "share of training labels (and of replay) kept aside for early stopping"}
    )
    augment: str = field(
        default="none",
        metadata={"help": "training augmentation: none, light, standard or a list (none measured best on digits)"},
    )
    time_budget_s: float = _setting("retrain_time_budget_s")
    seed: int = field(default=0, metadata={"help": "seeds sampling, LoRA init and the data order"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda"})
    threads: int = field(
        default=0,
        metadata={
            "help": "torch CPU threads for the job; 0 = auto: the cores the 1-minute load average leaves free, at "
            "least 1 (a job beside serving workers must not oversubscribe the cores: OpenMP threads then spin-wait "
            "for each other and a step gets ~8x slower on 2 busy cores)"
        },
    )

    def __post_init__(self) -> None:
        if self.holdout_trust not in HOLDOUT_TRUST:
            raise ValueError(
                f"unknown holdout_trust {self.holdout_trust!r}; choose trusted (the gate checks on trusted labels "
                "only) or any (on open feedback too)"
            )
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(
                f"unknown LoRA target policy {self.lora_targets!r}; choose one of {', '.join(LORA_TARGETS)}"
            )
        if self.margin < 0 or self.max_source_drop < 0:
            raise ValueError(
                "margin and max_source_drop are points of accuracy, >= 0 (ADAPTSERVE_RETRAIN_MARGIN, "
                "ADAPTSERVE_RETRAIN_MAX_SOURCE_DROP)"
            )
        if not 0 < self.holdout_fraction < 1 or not 0 < self.val_fraction < 1:
            raise ValueError("holdout_fraction and val_fraction must be between 0 and 1 (exclusive)")
        if self.replay_ratio < 0 or self.time_budget_s <= 0:
            raise ValueError("replay_ratio must be >= 0 and time_budget_s (ADAPTSERVE_RETRAIN_TIME_BUDGET_S) > 0")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = auto), got {self.threads}")
        if self.epochs < 1 or self.min_labels < 2 or self.min_holdout < 1:
            raise ValueError(
                "need epochs >= 1, min_labels (ADAPTSERVE_RETRAIN_MIN_TRAIN_LABELS) >= 2 (some go to validation) and "
                "min_holdout (ADAPTSERVE_RETRAIN_MIN_HOLDOUT_LABELS) >= 1"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RetrainConfig:
        """The ADAPTSERVE_RETRAIN_* settings (SettingsError naming a bad variable), then `overrides` on top.

        What a job started by the runner trains and gates with: the runner's environment is its job's."""
        loaded = settings.load(environ)
        values = {f.name: getattr(loaded, f.metadata["setting"]) for f in fields(cls) if "setting" in f.metadata}
        return cls(**(values | overrides))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RetrainResult:
    """`status` promoted | rejected; `version` the new champion (promoted only); `parent` the champion compared
    against (None: the base model); accuracies are fractions, margins and drops are points."""

    adapter: str
    status: str
    version: int | None
    parent: int | None
    numbers: dict[str, Any]
    reason: str

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- data


def _join(a: ImageSet, b: ImageSet) -> ImageSet:
    return ImageSet(a.images + b.images, a.labels + b.labels, a.classes)


def _load_samples(base_dir: Path, kind: str, classes: list[str]) -> ImageSet:
    path = find_samples(kind, base_dir)
    if path is None:
        raise RetrainError(
            f"base model {base_dir} has no {sample_path(base_dir, kind).relative_to(base_dir)}: retraining needs "
            "its source replay and holdout samples; rebuild it with `adaptserve pretrain --force`"
        )
    images, labels, sample_classes = load_samples(path)
    if sample_classes != classes:
        raise RetrainError(f"{path} has classes {sample_classes}, the base model {classes}")
    return ImageSet(images, [int(y) for y in labels], classes)


def split_labels(train: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A seeded val slice of the training labels for early stopping (the gate's holdout stays untouched)."""
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(val_fraction * len(train))))
    return train.subset(np.sort(order[n_val:])), train.subset(np.sort(order[:n_val]))


def replay_sample(pool: ImageSet, n_train: int, n_val: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Disjoint seeded samples of the source replay pool for training and validation."""
    order = np.random.default_rng(seed + 1).permutation(len(pool))
    n_train = min(n_train, len(pool))
    n_val = min(n_val, len(pool) - n_train)
    return pool.subset(np.sort(order[:n_train])), pool.subset(np.sort(order[n_train : n_train + n_val]))


# --------------------------------------------------------------------------------------------- models


def _lora_groups(model: nn.Module, cfg: RetrainConfig) -> list[dict]:
    """Optimizer groups of a loaded trainable adapter: LoRA matrices, its head, its norm layers."""
    groups: dict[str, list[nn.Parameter]] = {"lora": [], "head": [], "norms": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["lora" if "lora_" in name else "head" if ".head." in name else "norms"].append(param)
    lrs = {"lora": cfg.lr, "head": cfg.lr_head, "norms": cfg.lr}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def challenger_from(base: nn.Module, champion: AdapterVersion | None, cfg: RetrainConfig) -> Adaptation:
    """The model to train: the champion's adapter, trainable; or a fresh LoRA keeping the base's head."""
    if champion is None:
        adapt_cfg = AdaptConfig(
            strategy="lora",
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_targets=cfg.lora_targets,
            lora_lr=cfg.lr,
            lr_head=cfg.lr_head,
        )
        return adapt(base, adapt_cfg, base.num_classes, keep_head=True)
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(champion.path), is_trainable=True)
    return Adaptation(model, _lora_groups(model, cfg), "lora", notes={"parent": champion.version})


# --------------------------------------------------------------------------------------------- progress


def job_threads(requested: int = 0) -> int:
    """`requested`, or (0) the cores the 1-minute load average leaves free, at least 1."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(cores - os.getloadavg()[0] + 0.5)))


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with `n` torch CPU threads, then restore the previous setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


class _FitProgress:
    """`fit` reports through rich's add_task/update; this maps that onto `progress(fraction, message)` and
    enforces the time budget: once past the deadline it sets the (job-private) TrainConfig's patience to 0, so
    `fit` stops after this epoch and restores its best epoch's weights, as an early stop does."""

    def __init__(self, progress: Progress | None, lo: float, hi: float, train_cfg: TrainConfig, deadline: float):
        self.progress, self.lo, self.hi, self.train_cfg, self.deadline = progress, lo, hi, train_cfg, deadline
        self.done, self.out_of_time = 0, False

    def add_task(self, description: str, total: int) -> int:
        return 0

    def update(self, task: int, advance: int = 1, description: str = "") -> None:
        self.done += advance
        if self.progress:
            self.progress(
                self.lo + (self.hi - self.lo) * self.done / self.train_cfg.epochs, f"training: {description}"
            )
        if time.monotonic() > self.deadline and self.done < self.train_cfg.epochs:
            self.out_of_time = True
            self.train_cfg.patience = 0


# --------------------------------------------------------------------------------------------- the job


def _champion(registry, adapter: str) -> AdapterVersion | None:
    try:
        return registry.champion(adapter)
    except AdapterNotFoundError:
        return None


def _load_labels(home: Path, adapter: str, classes: list[str], cfg: RetrainConfig) -> LabelSplit:
    store = LabelStore(home, holdout_fraction=cfg.holdout_fraction)
    split = store.load_split(adapter, classes, limit=cfg.max_labels, holdout_trust=HOLDOUT_TRUST[cfg.holdout_trust])
    n_train, n_holdout = len(split.train), len(split.holdout)
    if n_train >= cfg.min_labels and n_holdout >= cfg.min_holdout:
        return split
    needs = (
        f"adapter {adapter!r} has {n_train} training and {n_holdout} holdout labels; a retrain needs at least "
        f"{cfg.min_labels} and {cfg.min_holdout} (ADAPTSERVE_RETRAIN_MIN_TRAIN_LABELS / "
        "ADAPTSERVE_RETRAIN_MIN_HOLDOUT_LABELS)"
    )
    if cfg.holdout_trust == "trusted" and n_holdout < cfg.min_holdout:
        raise RetrainError(
            f"{needs}. The gate's holdout takes trusted labels only (ADAPTSERVE_RETRAIN_HOLDOUT_TRUST=trusted; "
            f"{split.moved_to_train} untrusted holdout-split label(s) went to training, {split.conflicted} "
            f"conflicted one(s) were left out): add trusted holdout labels with `adaptserve data add DIR --adapter "
            f"{adapter}` (DIR/val/<class>/<image> all go to the holdout), or label with an admin or trusted-labeller "
            "token"
        )
    raise RetrainError(
        f"{needs}: collect more feedback (POST /feedback) or import labelled data (adaptserve data add)"
    )


@dataclass
class _Inputs:
    """Everything a job reads before it trains."""

    base_dir: Path
    base: nn.Module
    base_meta: ModelMeta
    champion: AdapterVersion | None
    labels_train: ImageSet
    labels_holdout: ImageSet
    source_holdout: ImageSet
    label_counts: dict[str, int] = field(default_factory=dict)  # LabelSplit.counts(): trust of what was used

    @property
    def prep(self):
        return self.base_meta.preprocessing

    @property
    def classes(self) -> list[str]:
        return list(self.base_meta.classes)


def _prepare(registry, home: Path, adapter: str, base_dir: Path, cfg: RetrainConfig) -> _Inputs:
    base, base_meta = load_model(base_dir)
    classes = list(base_meta.classes)
    labels = _load_labels(home, adapter, classes, cfg)
    source_holdout = _load_samples(base_dir, "holdout", classes)
    champion = _champion(registry, adapter)
    if champion is not None:
        # re-hash (fetched first when this home has no copy): a corrupted champion is refused before training on it,
        # and champion.path holds its files for challenger_from and _compare
        champion = registry.load_check(adapter, champion.version)
        trained_on = champion.meta.base_model
        if trained_on != base_meta.model_id:
            raise RetrainError(
                f"champion v{champion.version} of {adapter!r} was trained on base {trained_on}, not on "
                f"{base_meta.model_id} at {base_dir}: give the job the base model the adapter serves on"
            )
    return _Inputs(base_dir, base, base_meta, champion, labels.train, labels.holdout, source_holdout, labels.counts())


def _train(job: _Inputs, cfg: RetrainConfig, progress: Progress | None, deadline: float) -> tuple[nn.Module, dict]:
    """Train the challenger on (labels + replay); returns it (eval mode) and the training numbers."""
    seed_everything(cfg.seed)  # a fresh adapter's LoRA matrices are initialised before fit()
    adaptation = challenger_from(copy.deepcopy(job.base), job.champion, cfg)
    fit_train, fit_val = split_labels(job.labels_train, cfg.val_fraction, cfg.seed)
    n_replay = 0
    if cfg.replay_ratio > 0:
        pool = _load_samples(job.base_dir, "replay", job.classes)
        wanted = (int(round(cfg.replay_ratio * len(fit_train))), int(round(cfg.replay_ratio * len(fit_val))))
        replay_train, replay_val = replay_sample(pool, *wanted, cfg.seed)
        fit_train, fit_val, n_replay = _join(fit_train, replay_train), _join(fit_val, replay_val), len(replay_train)
    train_cfg = TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, patience=cfg.patience, seed=cfg.seed, device=cfg.device
    )
    budget = _FitProgress(progress, 0.05, 0.85, train_cfg, deadline)
    prep = job.prep
    fitted = fit(
        adaptation,
        fit_train.with_transform(prep.train_transform(parse_augment(cfg.augment))),
        fit_val.with_transform(prep.eval_transform()),
        train_cfg,
        budget,
    )
    numbers = {
        "replay": n_replay,
        "epochs_run": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "out_of_time": budget.out_of_time,
        "train_seconds": round(fitted.seconds, 2),
        "trainable_params": fitted.trainable_params,
    }
    return adaptation.model.eval(), numbers


def _compare(job: _Inputs, challenger: nn.Module, cfg: RetrainConfig) -> dict[str, Metrics]:
    """Champion (or the base, for a new adapter) and challenger on the target and the source holdouts."""
    device, classes, prep = resolve_device(cfg.device), job.classes, job.prep
    if job.champion is None:
        champion = job.base
    else:
        champion = load_adapter_model(job.champion.path, copy.deepcopy(job.base), job.base_meta)[0]
    champion = champion.to(device)
    target = job.labels_holdout.with_transform(prep.eval_transform())
    source = job.source_holdout.with_transform(prep.eval_transform())
    return {
        "champion_target": evaluate(champion, target, classes, device),
        "challenger_target": evaluate(challenger, target, classes, device),
        "champion_source": evaluate(champion, source, classes, device),
        "challenger_source": evaluate(challenger, source, classes, device),
    }


def _publish(
    registry, adapter: str, job: _Inputs, challenger: nn.Module, cfg: RetrainConfig, numbers: dict, metrics: dict
) -> AdapterVersion:
    """Save the challenger as a PEFT adapter with its reference samples, then publish + promote (a hot swap)."""
    meta = AdapterMeta.for_base(
        job.base_meta,
        parent=f"{job.champion.name}@v{job.champion.version}" if job.champion else None,  # None: the base
        config={"retrain": cfg.to_dict()},
        metrics={
            "target_test": metrics["challenger_target"].to_dict(),  # the adapters CLI lists target_test accuracy
            "source_test": metrics["challenger_source"].to_dict(),
            "gate": numbers,
        },
        data_fingerprint=job.labels_train.fingerprint(),
    )
    with tempfile.TemporaryDirectory(prefix="adaptserve-retrain-") as tmp:
        out = save_adapter(challenger.cpu(), meta, Path(tmp) / "adapter")
        save_image_set(sample_path(out, "reference"), job.labels_train, limit=500, seed=cfg.seed)  # drift reference
        save_image_set(sample_path(out, "holdout"), job.labels_holdout, limit=500, seed=cfg.seed)  # int8 check
        return publish(registry, adapter, out, job.base_dir, promote=True)


def retrain(
    home: str | Path,
    adapter: str,
    *,
    base_dir: str | Path | None = None,
    cfg: RetrainConfig | None = None,
    progress: Progress | None = None,
) -> RetrainResult:
    """Re-fine-tune `adapter` on its labels plus source replay; promote the challenger only if it passes the gate.

    Without `cfg`, the ADAPTSERVE_RETRAIN_* settings decide (`RetrainConfig.from_env`): a job process inherits its
    runner's environment. Raises RetrainError when the job cannot run (too few labels, a base model without
    samples)."""
    cfg = cfg or RetrainConfig.from_env()
    with torch_threads(job_threads(cfg.threads)) as threads:
        result = _run(Path(home), adapter, Path(base_dir or paths.default_model_dir()), cfg, progress)
    result.numbers["threads"] = threads
    return result


def _run(home: Path, adapter: str, base_dir: Path, cfg: RetrainConfig, progress: Progress | None) -> RetrainResult:
    start = time.monotonic()
    report = progress or (lambda fraction, message: None)
    registry = open_registry(home)
    report(0.0, f"loading the base model {base_dir.name}, the labels of {adapter!r} and the source samples")
    job = _prepare(registry, home, adapter, base_dir, cfg)
    challenger, numbers = _train(job, cfg, progress, start + cfg.time_budget_s)
    report(0.85, "evaluating champion and challenger on the target and source holdouts")
    metrics = _compare(job, challenger, cfg)
    numbers.update({f"{k}_acc": m.accuracy for k, m in metrics.items()})
    numbers.update(margin=cfg.margin, max_source_drop=cfg.max_source_drop)
    numbers.update(job.label_counts, holdout_trust=cfg.holdout_trust)  # labels_train, labels_holdout_trusted, ...
    passed, reason = gate(numbers, cfg)
    parent = job.champion.version if job.champion else None
    current = _champion(registry, adapter)
    now = current.version if current else None
    if passed and now != parent:  # someone promoted or rolled back meanwhile: our comparison is stale
        passed, reason = False, f"rejected: the champion changed during the job (v{parent} -> v{now}); run it again"
    version = None
    if passed:
        report(0.9, "publishing the challenger: ONNX export, register, promote")
        version = _publish(registry, adapter, job, challenger, cfg, numbers, metrics).version
        reason = f"promoted v{version}: " + reason.removeprefix("promoted: ")
    numbers["seconds"] = round(time.monotonic() - start, 2)
    report(1.0, reason)
    return RetrainResult(adapter, "promoted" if version else "rejected", version, parent, numbers, reason)
