"""pipelines.evaluate: metrics on hand-checked label arrays, the confusion PNG, evaluate() with a controlled model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipelines.data import ImageSet
from pipelines.evaluate import Metrics, compute_metrics, evaluate, predict, save_confusion_png

# Each case: y_true, y_pred, classes, then the numbers worked out by hand from the confusion matrix
# (rows = true class, columns = predicted class). Precision of a class never predicted is 0 (zero_division=0).
CASES = [
    pytest.param(
        [0, 1, 2, 0, 1, 2],
        [0, 1, 2, 0, 1, 2],
        ["a", "b", "c"],
        dict(
            accuracy=1.0,
            precision=1.0,
            recall=1.0,
            f1=1.0,
            confusion=[[2, 0, 0], [0, 2, 0], [0, 0, 2]],
            per_class={"a": (1.0, 1.0, 1.0, 2), "b": (1.0, 1.0, 1.0, 2), "c": (1.0, 1.0, 1.0, 2)},
        ),
        id="perfect",
    ),
    pytest.param(
        # a: 1 of 2 right, b: 2 of 2 right, c: both predicted as a, c is never predicted
        [0, 0, 1, 1, 2, 2],
        [0, 1, 1, 1, 0, 0],
        ["a", "b", "c"],
        dict(
            accuracy=3 / 6,
            # precision a = 1/3 (1 of 3 "a" predictions), b = 2/3, c = 0 (never predicted)
            precision=(1 / 3 + 2 / 3 + 0) / 3,
            recall=(1 / 2 + 1 + 0) / 3,
            # f1 a = 2*(1/3)(1/2)/(1/3+1/2) = 0.4, b = 2*(2/3)(1)/(5/3) = 0.8, c = 0
            f1=(0.4 + 0.8 + 0) / 3,
            confusion=[[1, 1, 0], [0, 2, 0], [2, 0, 0]],
            per_class={"a": (1 / 3, 1 / 2, 0.4, 2), "b": (2 / 3, 1.0, 0.8, 2), "c": (0.0, 0.0, 0.0, 2)},
        ),
        id="class-never-predicted",
    ),
    pytest.param(
        # binary, unbalanced: 4 x "neg", 2 x "pos"
        [0, 0, 0, 0, 1, 1],
        [0, 0, 1, 1, 1, 0],
        ["neg", "pos"],
        dict(
            accuracy=3 / 6,
            # neg: P 2/3, R 2/4, F1 2*(2/3)(1/2)/(7/6) = 4/7; pos: P 1/3, R 1/2, F1 2*(1/3)(1/2)/(5/6) = 0.4
            precision=(2 / 3 + 1 / 3) / 2,
            recall=(1 / 2 + 1 / 2) / 2,
            f1=(4 / 7 + 0.4) / 2,
            confusion=[[2, 2], [1, 1]],
            per_class={"neg": (2 / 3, 1 / 2, 4 / 7, 4), "pos": (1 / 3, 1 / 2, 0.4, 2)},
        ),
        id="binary-unbalanced",
    ),
    pytest.param(
        # "z" is in `classes` but occurs in neither array: it still has a row/column and counts 0 in macro averages
        [0, 1, 0, 1],
        [0, 1, 1, 1],
        ["x", "y", "z"],
        dict(
            accuracy=3 / 4,
            precision=(1 + 2 / 3 + 0) / 3,
            recall=(1 / 2 + 1 + 0) / 3,
            # f1 x = 2*(1)(1/2)/(3/2) = 2/3, y = 2*(2/3)(1)/(5/3) = 0.8
            f1=(2 / 3 + 0.8 + 0) / 3,
            confusion=[[1, 1, 0], [0, 2, 0], [0, 0, 0]],
            per_class={"x": (1.0, 1 / 2, 2 / 3, 2), "y": (2 / 3, 1.0, 0.8, 2), "z": (0.0, 0.0, 0.0, 0)},
        ),
        id="class-absent-everywhere",
    ),
    pytest.param(
        [1, 1, 1],
        [0, 0, 0],
        ["p", "q"],
        dict(
            accuracy=0.0,
            precision=0.0,
            recall=0.0,
            f1=0.0,
            confusion=[[0, 0], [3, 0]],
            per_class={"p": (0.0, 0.0, 0.0, 0), "q": (0.0, 0.0, 0.0, 3)},
        ),
        id="all-wrong",
    ),
]


@pytest.mark.parametrize("y_true, y_pred, classes, expected", CASES)
def test_compute_metrics_matches_hand_computation(y_true, y_pred, classes, expected):
    m = compute_metrics(np.array(y_true), np.array(y_pred), classes)
    assert m.n == len(y_true)
    assert m.accuracy == pytest.approx(expected["accuracy"])
    assert m.precision == pytest.approx(expected["precision"])
    assert m.recall == pytest.approx(expected["recall"])
    assert m.f1 == pytest.approx(expected["f1"])
    assert m.confusion == expected["confusion"]
    assert list(m.per_class) == classes
    for name, (p, r, f, support) in expected["per_class"].items():
        got = m.per_class[name]
        assert (got["precision"], got["recall"], got["f1-score"]) == pytest.approx((p, r, f)), name
        assert got["support"] == support
    # plain Python types: the metrics go to JSON
    assert type(m.accuracy) is float and type(m.n) is int
    assert json.loads(json.dumps(m.to_dict())) == m.to_dict()
    assert m.summary() == {"accuracy": m.accuracy, "precision": m.precision, "recall": m.recall, "f1": m.f1, "n": m.n}


# ------------------------------------------------------------------------------------------ confusion PNG


def _png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        arr = np.asarray(im.convert("L"))
    assert arr.min() < 128 < arr.max(), "something is drawn"
    return im.size


def test_save_confusion_png_writes_square_pngs_that_grow_with_classes(tmp_path):
    sizes = {}
    for n in (2, 25):  # 25: rotated tick labels and no per-cell numbers
        classes = [f"class{i}" for i in range(n)]
        y = np.arange(3 * n) % n
        m = compute_metrics(y, (y + (y % 3 == 0)) % n, classes)
        path = save_confusion_png(m, classes, tmp_path / "nested" / str(n) / "cm.png", title="t" if n == 2 else "")
        assert path == tmp_path / "nested" / str(n) / "cm.png"
        sizes[n] = _png_size(path)
        assert sizes[n][0] == sizes[n][1] > 0
    assert sizes[25][0] > sizes[2][0]


# ------------------------------------------------------------------------------------------ evaluate()


class Oracle(nn.Module):
    """Predicts the class stored in feature 0 of each input; records the batch sizes it saw."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.scale = nn.Parameter(torch.ones(1))
        self.batches: list[int] = []
        self.training_flags: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        self.training_flags.append(self.training)
        return nn.functional.one_hot(x[:, 0].long(), self.n_classes).float() * self.scale


class TensorSet(torch.utils.data.Dataset):
    def __init__(self, predictions: list[int], labels: list[int]):
        self.x = [torch.tensor([float(p), 0.0]) for p in predictions]
        self.y = labels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize(
    "predictions, labels, accuracy, confusion",
    [
        pytest.param([0, 1, 2, 2], [0, 1, 2, 1], 3 / 4, [[1, 0, 0], [0, 1, 1], [0, 0, 1]], id="one-wrong"),
        pytest.param([2, 2, 2], [0, 1, 2], 1 / 3, [[0, 0, 1], [0, 0, 1], [0, 0, 1]], id="always-c"),
    ],
)
def test_evaluate_uses_model_predictions(predictions, labels, accuracy, confusion):
    model = Oracle(3).train()
    m = evaluate(model, TensorSet(predictions, labels), ["a", "b", "c"])
    assert isinstance(m, Metrics)
    assert m.n == len(labels)
    assert m.accuracy == pytest.approx(accuracy)
    assert m.confusion == confusion
    assert model.training_flags == [False], "evaluated in eval mode, one batch"


def test_predict_batches_in_order():
    rng = np.random.default_rng(0)
    preds = [int(v) for v in rng.integers(0, 4, 300)]
    labels = [int(v) for v in rng.integers(0, 4, 300)]
    model = Oracle(4)
    y, p = predict(model, TensorSet(preds, labels), batch_size=128)
    assert model.batches == [128, 128, 44]
    assert y.tolist() == labels and p.tolist() == preds
    assert y.shape == p.shape == (300,)


def test_evaluate_on_an_image_set_with_a_transform():
    """The real path: ImageSet of PIL images + a transform to tensors; the 'model' reads the red channel."""
    colours = {0: (250, 0, 0), 1: (0, 250, 0)}
    labels = [0, 1, 1, 0, 1]
    images = [Image.new("RGB", (8, 8), colours[label]) for label in labels]
    images[2] = Image.new("RGB", (8, 8), colours[0])  # one image that looks like class 0

    class RedIsZero(nn.Module):
        def forward(self, x):
            red = x[:, 0].mean(dim=(1, 2))
            return torch.stack([red, 1 - red], dim=1)

    def to_tensor(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)

    ds = ImageSet(images, labels, ["red", "green"]).with_transform(to_tensor)
    m = evaluate(RedIsZero(), ds, ds.classes)
    assert m.accuracy == pytest.approx(4 / 5)
    assert m.confusion == [[2, 0], [1, 2]]
    assert m.per_class["green"]["recall"] == pytest.approx(2 / 3)
