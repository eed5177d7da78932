"""Evaluation: accuracy, macro precision/recall/F1, per-class report and the confusion matrix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class Metrics:
    accuracy: float
    precision: float
    recall: float
    f1: float
    n: int
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]

    def summary(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "n": self.n,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> Metrics:
    labels = list(range(len(classes)))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0
    )
    per_class = {c: {k: float(v) for k, v in report[c].items()} for c in classes}
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return Metrics(
        float(accuracy_score(y_true, y_pred)), float(p), float(r), float(f), int(len(y_true)), per_class, cm.tolist()
    )


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) over `dataset`, model in eval mode."""
    model.eval()
    ys, ps = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        ps.append(model(x.to(device)).argmax(1).cpu())
        ys.append(torch.as_tensor(y))
    return torch.cat(ys).numpy(), torch.cat(ps).numpy()


def evaluate(model: nn.Module, dataset: Dataset, classes: list[str], device: torch.device | str = "cpu") -> Metrics:
    y, p = predict(model, dataset, device)
    return compute_metrics(y, p, classes)


def save_confusion_png(metrics: Metrics, classes: list[str], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics.confusion)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {metrics.accuracy:.3f}, macro-F1 {metrics.f1:.3f}")
    if len(classes) <= 20:
        top = cm.max() or 1
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
