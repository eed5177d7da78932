import pytest
import torch
from torch import nn

from models.classifier import build_classifier, freeze_batchnorm_of_frozen, stage_parameters
from models.lora import lora_targets
from models.strategies import STRATEGIES, AdaptConfig, adapt, stage_lrs


def _model(classes: int = 10):
    torch.manual_seed(0)
    return build_classifier("resnet18", classes)


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_feature_extraction_trains_only_the_new_head() -> None:
    a = adapt(_model(), AdaptConfig(strategy="feature-extraction"), num_classes=4)
    assert _trainable_names(a.model) == {"head.1.weight", "head.1.bias"}
    assert a.model.num_classes == 4


@pytest.mark.parametrize("k", [0, 1, 2, 4], ids=lambda k: f"freeze{k}")
def test_finetune_freezes_the_first_k_stages_with_rates_growing_with_depth(k: int) -> None:
    cfg = AdaptConfig(strategy="finetune", freeze_stages=k, lr_backbone_min=1e-5, lr_backbone_max=1e-4)
    a = adapt(_model(), cfg, num_classes=10)
    stages = stage_parameters(a.model)
    for i, params in enumerate(stages):
        assert all(p.requires_grad == (i >= k) for p in params), f"stage {i}"
    trained = [g["lr"] for g in a.param_groups if g["name"].startswith("stage")][k:]
    assert trained == sorted(trained) and trained[-1] == pytest.approx(1e-4)
    assert trained[0] == pytest.approx(1e-5 if len(trained) > 1 else 1e-4)
    assert [g for g in a.param_groups if g["name"] == "head"][0]["lr"] == 1e-3


def test_finetune_full_unfreeze_in_the_last_epochs() -> None:
    a = adapt(_model(), AdaptConfig(strategy="finetune", freeze_stages=2, full_unfreeze_epochs=2), num_classes=10)
    frozen = stage_parameters(a.model)[0]
    assert a.on_epoch(0, 5) is None and not frozen[0].requires_grad
    assert a.on_epoch(3, 5) == "unfroze stages 0..1 at lr 1e-05"
    assert all(p.requires_grad for p in a.model.parameters())


def test_gradual_unfreeze_adds_one_stage_every_n_epochs() -> None:
    a = adapt(_model(), AdaptConfig(strategy="gradual-unfreeze", unfreeze_every=2), num_classes=10)
    stages = stage_parameters(a.model)
    seen = []
    for epoch in range(12):
        a.on_epoch(epoch, 12)
        seen.append(sum(all(p.requires_grad for p in s) for s in stages))
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert stages[-1][0].requires_grad and all(p.requires_grad for p in a.model.head.parameters())


def test_scratch_is_the_same_architecture_randomly_initialised() -> None:
    source = _model()
    a = adapt(source, AdaptConfig(strategy="scratch"), num_classes=10)
    assert a.model is not source
    assert [n for n, _ in a.model.named_parameters()] == [n for n, _ in source.named_parameters()]
    w_src, w_new = source.backbone.conv1.weight, a.model.backbone.conv1.weight
    assert not torch.equal(w_src, w_new)
    assert all(p.requires_grad for p in a.model.parameters())


@pytest.mark.parametrize(
    "policy, expected_targets",
    [("late", 5), ("half", 5 + 5 + 5), ("all", 1 + 4 + 5 + 5 + 5), ("head", 1)],
    ids=["late", "half", "all", "head"],
)
def test_lora_target_policy_by_depth(policy: str, expected_targets: int) -> None:
    targets, norms = lora_targets(_model(), policy)
    assert len(targets) == expected_targets
    if policy == "late":
        assert all(t.startswith("backbone.layer4.") for t in targets)
        assert "backbone.layer4.0.bn1" in norms and "backbone.layer3.0.bn1" not in norms


def test_lora_trains_under_five_percent_and_never_touches_the_base() -> None:
    model = _model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    a = adapt(model, AdaptConfig(strategy="lora", lora_targets="all"), num_classes=10)
    trainable, total = a.trainable()
    assert 0 < trainable / total < 0.05
    opt = torch.optim.AdamW(a.param_groups)
    a.model.train()
    freeze_batchnorm_of_frozen(a.model)
    for _ in range(2):
        loss = nn.functional.cross_entropy(a.model(torch.randn(8, 3, 32, 32)), torch.arange(8) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    base = a.model.get_base_model()
    for key, value in base_state.items():
        # the adapter trains its own copies of the head and norms; the originals must be untouched
        assert torch.equal(_original(base, key), value), key
    with a.model.disable_adapter():
        a.model.eval()
        x = torch.randn(4, 3, 32, 32)
        assert torch.allclose(a.model(x), _reference(base_state)(x), atol=1e-5)


def _original(root: nn.Module, key: str) -> torch.Tensor:
    """Walk a dotted state-dict key through peft wrappers to the base model's own tensor."""
    node = root
    for part in key.split("."):
        node = getattr(node, "original_module", node)
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _reference(state: dict) -> nn.Module:
    model = _model()
    model.load_state_dict(state)
    return model.eval()


def test_lora_head_policy_needs_the_source_classes() -> None:
    with pytest.raises(ValueError, match="LoRA policy 'head' adapts the source head"):
        adapt(_model(10), AdaptConfig(strategy="lora", lora_targets="head"), num_classes=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "magic"}, "unknown strategy 'magic'; choose one of feature-extraction, finetune"),
        ({"lora_targets": "deep"}, "unknown LoRA target policy 'deep'; choose one of head, late, half, all"),
        ({"lora_r": 0}, "lora_r and unfreeze_every must be >= 1 and freeze_stages >= 0"),
        ({"lr_backbone_min": 1e-3, "lr_backbone_max": 1e-4}, "need 0 < lr_backbone_min <= lr_backbone_max"),
    ],
    ids=["strategy", "policy", "rank", "rates"],
)
def test_adapt_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AdaptConfig(**kwargs)


def test_stage_lrs_are_geometric() -> None:
    assert stage_lrs(3, 1e-5, 1e-3) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert stage_lrs(1, 1e-5, 1e-3) == [1e-3]


def test_every_strategy_is_buildable() -> None:
    for s in STRATEGIES:
        assert adapt(_model(), AdaptConfig(strategy=s), num_classes=5).model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
