import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.catalog import CATALOG, WeightsUnavailableError, build_backbone, get_spec
from models.classifier import Classifier, build_classifier, stage_of, stage_parameters

REQUIRED = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16"]


def test_catalog_has_the_required_backbones() -> None:
    assert set(REQUIRED) <= set(CATALOG)


@pytest.mark.parametrize("name", REQUIRED, ids=REQUIRED)
def test_every_backbone_gives_logits_and_embedding_of_its_feature_dim(name: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=7).eval()
    size = 224 if name == "vit_b_16" else 64  # ViT-B/16 has a fixed input size
    with torch.no_grad():
        logits, embedding = model.forward_with_embedding(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    assert embedding.shape == (2, get_spec(name).feature_dim)


@pytest.mark.parametrize("name", REQUIRED, ids=REQUIRED)
def test_stages_partition_the_backbone_and_none_is_empty(name: str) -> None:
    model = build_classifier(name, num_classes=3)
    groups = stage_parameters(model)
    assert all(groups), [len(g) for g in groups]
    assert sum(len(g) for g in groups) == len(list(model.backbone.parameters()))
    assert stage_of("head.1.weight", model.spec) is None


def test_unknown_backbone_names_the_choices() -> None:
    with pytest.raises(KeyError, match="unknown backbone 'resnet7'; choose one of convnext_tiny"):
        get_spec("resnet7")


def test_imagenet_weights_offline_raise_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        build_backbone("resnet18", "imagenet")
    message = str(err.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights path/to/file.safetensors" in message


def test_local_safetensors_checkpoint_loads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = build_backbone("resnet18", None)
    save_file(reference.state_dict(), str(tmp_path / "r18.safetensors"))
    loaded = build_backbone("resnet18", tmp_path / "r18.safetensors")
    for (k, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_local_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    save_file(build_backbone("mobilenet_v3_large", None).state_dict(), str(tmp_path / "m.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="does not match this architecture"):
        build_backbone("resnet18", tmp_path / "m.safetensors")


def test_missing_local_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_backbone("resnet18", tmp_path / "nope.safetensors")


def test_head_replacement_keeps_backbone_and_resets_head() -> None:
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10)
    before = model.backbone.layer1[0].conv1.weight.clone()
    model.reset_head(4, dropout=0.3)
    assert isinstance(model, Classifier) and model.num_classes == 4 and model.head[0].p == 0.3
    assert torch.equal(before, model.backbone.layer1[0].conv1.weight)
