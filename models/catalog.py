"""The backbone catalog: every supported torchvision model described once.

Each entry says how to build the architecture, where its pre-trained weights come from (a torchvision
weights enum), how it preprocesses images, how wide its penultimate features are, how its layers group
into stages (for freezing and gradual unfreezing), where its classification head is, and which layers
LoRA may adapt at each depth. Training, evaluation and serving all read these facts from here.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from models.preprocessing import Preprocessing


class WeightsUnavailableError(RuntimeError):
    """Pre-trained weights could not be loaded (offline, no cache, bad file)."""


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the system needs to know about one torchvision architecture."""

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type[torchvision.models.WeightsEnum]
    feature_dim: int
    head_path: str = field(metadata={"help": "dotted path of the final nn.Linear that the new head replaces"})
    stages: tuple[tuple[str, ...], ...] = field(
        metadata={"help": "module-name prefixes grouped into stages, input side first; the head is not a stage"}
    )
    lora_layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
    lora_exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "name fragments LoRA must never target (e.g. attention out_proj, see vit)"}
    )

    @property
    def default_weights(self) -> torchvision.models.WeightsEnum:
        return self.weights_enum.DEFAULT

    def imagenet_preprocessing(self) -> Preprocessing:
        return Preprocessing.from_weights(self.default_weights)


def _resnet_stages() -> tuple[tuple[str, ...], ...]:
    return (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def _features_stages(groups: list[list[int]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(f"features.{i}" for i in group) for group in groups)


def _vit_stages() -> tuple[tuple[str, ...], ...]:
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    stem = ("conv_proj", "class_token", "encoder.pos_embedding")
    return (stem, tuple(blocks[0:3]), tuple(blocks[3:6]), tuple(blocks[6:9]), tuple(blocks[9:12]) + ("encoder.ln",))


CATALOG: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        "resnet18", torchvision.models.resnet18, torchvision.models.ResNet18_Weights, 512, "fc", _resnet_stages()
    ),
    "resnet50": BackboneSpec(
        "resnet50", torchvision.models.resnet50, torchvision.models.ResNet50_Weights, 2048, "fc", _resnet_stages()
    ),
    "mobilenet_v3_large": BackboneSpec(
        "mobilenet_v3_large",
        torchvision.models.mobilenet_v3_large,
        torchvision.models.MobileNet_V3_Large_Weights,
        1280,
        "classifier.3",
        _features_stages([[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14], [15, 16]]),
    ),
    "efficientnet_b0": BackboneSpec(
        "efficientnet_b0",
        torchvision.models.efficientnet_b0,
        torchvision.models.EfficientNet_B0_Weights,
        1280,
        "classifier.1",
        _features_stages([[0, 1], [2, 3], [4], [5, 6], [7, 8]]),
    ),
    "convnext_tiny": BackboneSpec(
        "convnext_tiny",
        torchvision.models.convnext_tiny,
        torchvision.models.ConvNeXt_Tiny_Weights,
        768,
        "classifier.2",
        _features_stages([[0], [1, 2], [3, 4], [5, 6], [7]]),
    ),
    # nn.MultiheadAttention reads out_proj.weight directly, so a LoRA wrapper on it would be silently
    # bypassed; LoRA targets the MLP linears (and the patch projection) instead.
    "vit_b_16": BackboneSpec(
        "vit_b_16",
        torchvision.models.vit_b_16,
        torchvision.models.ViT_B_16_Weights,
        768,
        "heads.head",
        _vit_stages(),
        lora_exclude=("self_attention",),
    ),
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(CATALOG))}") from None


def _load_torchvision_weights(spec: BackboneSpec, model: nn.Module, weights_name: str) -> None:
    weights = spec.default_weights if weights_name in ("imagenet", "DEFAULT") else spec.weights_enum[weights_name]
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsUnavailableError(
            f"could not load {weights} for {spec.name} from {weights.url} ({err}). Offline? Download the file "
            f"elsewhere and place it at {cache} (TORCH_HOME controls that directory), or pass a local "
            f"checkpoint with --weights path/to/file.safetensors"
        ) from err
    model.load_state_dict(state)


def _load_local_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except Exception as err:  # safetensors and torch raise many types for a bad file
        raise WeightsUnavailableError(f"could not read weights file {path}: {err}") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"weights file {path} does not match this architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_backbone(name: str, weights: str | Path | None = None, **kwargs: object) -> nn.Module:
    """Build `name` with the original 1000-class head and load `weights`.

    weights: None or "none" = random init; "imagenet" (or a weights-enum member name such as
    "IMAGENET1K_V1") = torchvision's pre-trained weights; a path = a local .safetensors (or .pth) checkpoint
    of the whole backbone with its original head.
    """
    spec = get_spec(name)
    model = spec.builder(weights=None, **kwargs)
    if weights is None or weights == "none":
        return model
    if isinstance(weights, Path) or Path(str(weights)).suffix in (".safetensors", ".pth", ".pt"):
        _load_local_weights(model, Path(weights))
    else:
        _load_torchvision_weights(spec, model, str(weights))
    return model
