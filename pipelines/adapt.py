"""Pretraining the embedded source model and adapting a model to a target domain, end to end."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.artifacts import load_adapter_model, load_model, save_adapter, save_model, write_json
from models.classifier import build_classifier
from models.metadata import MODEL_META, AdapterMeta, ModelMeta
from models.preprocessing import Preprocessing, parse_augment
from models.samples import sample_path, save_image_set
from models.strategies import AdaptConfig, adapt
from pipelines.data import DataSplits, ImageSet, digits_splits
from pipelines.evaluate import Metrics, evaluate, save_confusion_png
from pipelines.train import FitResult, TrainConfig, fit, resolve_device, seed_everything


@dataclass
class AdaptResult:
    strategy: str
    out: Path
    target: Metrics
    source: Metrics | None
    fit: FitResult

    def summary(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "out": str(self.out),
            "trainable_params": self.fit.trainable_params,
            "total_params": self.fit.total_params,
            "trainable_pct": 100.0 * self.fit.trainable_params / self.fit.total_params,
            "train_seconds": round(self.fit.seconds, 2),
            "epochs_run": len(self.fit.history),
            "best_epoch": self.fit.best_epoch,
            "target": self.target.summary(),
            "source": self.source.summary() if self.source else None,
        }


def _with(dataset: ImageSet, prep: Preprocessing, augment: tuple[str, ...] | None = None) -> ImageSet:
    return dataset.with_transform(prep.train_transform(augment) if augment is not None else prep.eval_transform())


def pretrain(
    out: str | Path,
    backbone: str = "resnet18",
    train_cfg: TrainConfig | None = None,
    size: int = 32,
    augment: str = "light",
    progress=None,
) -> tuple[Path, ModelMeta]:
    """Train the embedded source model from scratch on scikit-learn's digits; no download anywhere."""
    cfg = train_cfg or TrainConfig(epochs=6, batch_size=32, patience=3)
    seed_everything(cfg.seed)  # weight init happens before fit(): seed it too, or runs differ
    data, prep = digits_splits(size, seed=0), Preprocessing.for_size(size)
    model = build_classifier(backbone, len(data.classes))
    adaptation = adapt(model, AdaptConfig(strategy="scratch"), len(data.classes), keep_head=True)
    result = fit(adaptation, _with(data.train, prep, parse_augment(augment)), _with(data.val, prep), cfg, progress)
    metrics = evaluate(adaptation.model, _with(data.test, prep), data.classes, resolve_device(cfg.device))
    meta = ModelMeta.for_model(
        adaptation.model,
        classes=data.classes,
        preprocessing=prep,
        name=Path(out).name,
        strategy="scratch",
        config={"train": cfg.to_dict(), "augment": augment, "data": "sklearn-digits"},
        metrics={"test": metrics.to_dict()},
        data_fingerprint=data.train.fingerprint(),
        fit=_fit_record(result),
    )
    path = save_model(adaptation.model.cpu(), meta, out)
    save_image_set(sample_path(path, "reference"), data.val)  # drift reference of the base
    save_image_set(sample_path(path, "replay"), data.train, limit=1000)  # replayed by re-fine-tuning
    save_image_set(sample_path(path, "holdout"), data.test)  # every gate's forgetting check
    save_confusion_png(metrics, data.classes, path / "confusion.png", f"{path.name}: source test")
    return path, ModelMeta.read(path)


def _fit_record(result: FitResult) -> dict[str, Any]:
    return {"seconds": result.seconds, "best_epoch": result.best_epoch, "history": result.history}


def adapt_model(
    base_dir: str | Path,
    target: DataSplits,
    out: str | Path,
    adapt_cfg: AdaptConfig,
    train_cfg: TrainConfig,
    source: DataSplits | None = None,
    augment: str = "light",
    progress=None,
) -> AdaptResult:
    """Adapt the base model at `base_dir` to `target`; evaluate on the target test split and, when the
    class sets match, on the source test split too (so forgetting is a number); save the artifact."""
    seed_everything(train_cfg.seed)  # the new head and the LoRA matrices are initialised here, before fit()
    base, base_meta = load_model(base_dir)
    prep = base_meta.preprocessing
    device = resolve_device(train_cfg.device)
    keep_classes = tuple(target.classes) == base_meta.classes
    adaptation = adapt(base, adapt_cfg, len(target.classes))
    result = fit(
        adaptation, _with(target.train, prep, parse_augment(augment)), _with(target.val, prep), train_cfg, progress
    )
    model = adaptation.model
    target_metrics = evaluate(model, _with(target.test, prep), target.classes, device)
    source_metrics = (
        evaluate(model, _with(source.test, prep), source.classes, device) if source and keep_classes else None
    )
    recipe = {
        "strategy": adapt_cfg.strategy,
        "head_dropout": adapt_cfg.head_dropout,
        "config": {"adapt": asdict(adapt_cfg), "train": train_cfg.to_dict(), "augment": augment},
        "metrics": {
            "target_test": target_metrics.to_dict(),
            "source_test": source_metrics.to_dict() if source_metrics else None,
        },
        "data_fingerprint": target.train.fingerprint(),
        "parent": base_meta.model_id,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "fit": _fit_record(result),
    }
    out = Path(out)
    if adapt_cfg.strategy == "lora":
        save_adapter(model.cpu(), AdapterMeta.for_base(base_meta, classes=target.classes, **recipe), out)
    else:
        save_model(model.cpu(), ModelMeta.for_model(model, classes=target.classes, preprocessing=prep, **recipe), out)
    reference = ImageSet(target.train.images + target.val.images, target.train.labels + target.val.labels,
                         target.classes)
    save_image_set(sample_path(out, "reference"), reference, limit=500)  # publish() builds the drift reference
    save_image_set(sample_path(out, "holdout"), target.test, limit=500)  # what the int8 engine is measured on
    save_confusion_png(target_metrics, target.classes, out / "confusion.png", f"{adapt_cfg.strategy}: target test")
    write_json(
        out / "metrics.json",
        {"target_test": target_metrics.to_dict(), "source_test": source_metrics.to_dict() if source_metrics else None},
    )
    return AdaptResult(adapt_cfg.strategy, out, target_metrics, source_metrics, result)


def load_for_inference(path: str | Path, base_dir: str | Path | None = None):
    """(model in eval mode, its ModelMeta or AdapterMeta, the preprocessing it serves with) for a model dir or an
    adapter dir; an adapter serves with its base model's preprocessing."""
    path = Path(path)
    if (path / MODEL_META).exists():
        model, meta = load_model(path)
        return model, meta, meta.preprocessing
    if base_dir is None:
        raise ValueError(f"{path} is an adapter: give the base model it was trained on")
    base, base_meta = load_model(base_dir)
    model, meta = load_adapter_model(path, base, base_meta)
    return model, meta, base_meta.preprocessing
