import pytest
import torch

from models.classifier import build_classifier
from models.preprocessing import Preprocessing
from models.strategies import AdaptConfig, adapt
from pipelines.data import digits_splits, per_class_subset
from pipelines.train import TrainConfig, fit


@pytest.fixture(scope="module")
def tiny_digits():
    data = digits_splits(32)
    prep = Preprocessing.for_size(32)
    train = per_class_subset(data.train, 12).with_transform(prep.eval_transform())
    val = per_class_subset(data.val, 6).with_transform(prep.eval_transform())
    return train, val


def _run(tiny_digits, strategy: str = "scratch", **train_kwargs):
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10)
    a = adapt(model, AdaptConfig(strategy=strategy), 10, keep_head=True)
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 32, "seed": 0, **train_kwargs})
    return a, fit(a, *tiny_digits, cfg)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"optimizer": "sgd"}, {"schedule": "plateau"}, {"label_smoothing": 0.1}],
    ids=["adamw-cosine", "sgd", "plateau", "smoothing"],
)
def test_training_lowers_the_training_loss(tiny_digits, kwargs: dict) -> None:
    _, result = _run(tiny_digits, **kwargs)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses


def test_same_seed_same_weights_and_history(tiny_digits) -> None:
    a1, r1 = _run(tiny_digits, epochs=2)
    a2, r2 = _run(tiny_digits, epochs=2)
    assert [h["val_loss"] for h in r1.history] == [h["val_loss"] for h in r2.history]
    assert torch.equal(a1.model.head[1].weight, a2.model.head[1].weight)


def test_early_stopping_stops_when_val_loss_stalls(tiny_digits) -> None:
    # a learning rate of ~0 never improves validation loss after the first epoch
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10)
    a = adapt(model, AdaptConfig(strategy="feature-extraction", lr_head=1e-12), 10)
    result = fit(a, *tiny_digits, TrainConfig(epochs=20, patience=2, batch_size=64))
    assert len(result.history) == 3 and result.best_epoch == 0


def test_best_epoch_weights_are_restored(tiny_digits) -> None:
    a, result = _run(tiny_digits, epochs=4)
    from pipelines.train import validate

    loader = torch.utils.data.DataLoader(tiny_digits[1], batch_size=256)
    loss, _ = validate(a.model, loader, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    assert loss == pytest.approx(min(h["val_loss"] for h in result.history), rel=1e-4)


def test_gradual_unfreeze_events_are_logged(tiny_digits) -> None:
    torch.manual_seed(0)
    a = adapt(build_classifier("resnet18", 10), AdaptConfig(strategy="gradual-unfreeze"), 10)
    result = fit(a, *tiny_digits, TrainConfig(epochs=3, batch_size=64, patience=5))
    assert [h["event"] for h in result.history] == [None, "unfroze the last 1 stage(s)", "unfroze the last 2 stage(s)"]
    assert result.trainable_params > 8_000_000  # layer3+layer4 of resnet18 by the end


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "lion"}, "optimizer must be adamw or sgd, got 'lion'"),
        ({"schedule": "step"}, "schedule must be cosine or plateau, got 'step'"),
        ({"epochs": 0}, "epochs and batch_size must be at least 1"),
    ],
    ids=["optimizer", "schedule", "epochs"],
)
def test_train_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
