"""What an artifact says about itself: model.json and an adapter's metadata.json as typed, versioned records.

`ModelMeta` describes a full model (a pretrained base, or a fully fine-tuned one) and `AdapterMeta` a LoRA adapter,
whose weights and peft's own adapter_config.json lie beside it: each is its own artifact, the way peft's LoraConfig
is. Invariants of the JSON round trip (`from_dict` / `to_dict`, `from_json` / `to_json`):

- every file this project has written loads: an optional key an older file lacks gets its default; a missing
  required key is an ArtifactError that names the file and the key;
- keys this code does not know (written by newer code, or merged in by `registry.register(metadata=...)`) are kept
  in `extra` and written back as they were, so a load + save loses nothing;
- `to_dict` writes every field (None where unknown) plus `kind` and `num_classes`, under the same key names the
  files have always used; `format_version` is the file's own (1 for every file so far), a newer one still loads;
- `num_classes == len(classes)`: a file whose `num_classes` disagrees is refused.

Torch-free on purpose: the service module, the job runner and the registry read metadata without importing torch;
only `ModelMeta`'s preprocessing (models.preprocessing builds torchvision transforms) imports it, when parsed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

if TYPE_CHECKING:
    from models.classifier import Classifier
    from models.preprocessing import Preprocessing

FORMAT_VERSION = 1
MODEL_META, ADAPTER_META = "model.json", "metadata.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", ADAPTER_META)
BASE_NAME = "base"  # the base model served, captured and monitored as if it were an adapter of this name
BASE: tuple[str, int] = (BASE_NAME, 0)  # its (adapter, version) key in engines and drift checks


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, or does not fit the model it is loaded onto."""


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON file at `path`; ArtifactError when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None


def _plain(value: Any) -> Any:
    """`value` as JSON types: tuples become lists, a Preprocessing its dict."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Invalid(ValueError):
    """A field's value is unusable; the message reads after the field's name."""


def _classes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(c, str) for c in value):
        raise _Invalid(f"must be a list of class names, got {value!r}")
    return tuple(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _preprocessing(value: Any) -> Preprocessing:
    # models.preprocessing imports torch and torchvision: only readers of a model's preprocessing pay for it
    from models.preprocessing import Preprocessing

    if isinstance(value, Preprocessing):
        return value
    try:
        return Preprocessing.from_dict(value)
    except (KeyError, TypeError, ValueError) as err:
        raise _Invalid(f"is not a preprocessing record ({type(err).__name__}: {err}): {value!r}") from None


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class _Meta:
    """The fields models and adapters share: what they classify, how they were trained, how they scored."""

    kind: ClassVar[str]
    file: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    _parse: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "classes": _classes,
        "head_dropout": float,
        "trainable_params": _optional_int,
        "total_params": _optional_int,
        "format_version": int,
    }

    classes: tuple[str, ...] = field(metadata=_help("class names, in the order of the logits"))
    strategy: str | None = field(default=None, metadata=_help("how it was trained: scratch, lora, finetune, ..."))
    head_dropout: float = field(default=0.0, metadata=_help("dropout before the classification head"))
    config: Mapping[str, Any] = field(default_factory=dict, metadata=_help("the resolved training configuration"))
    metrics: Mapping[str, Any] = field(
        default_factory=dict, metadata=_help("metrics per evaluation split (test, target_test, source_test, gate)")
    )
    data_fingerprint: str | None = field(default=None, metadata=_help("sha256 prefix of the training data"))
    parent: str | None = field(default=None, metadata=_help("what it was trained from: a model_id or name@vN"))
    trainable_params: int | None = field(default=None, metadata=_help("parameters that were trained"))
    total_params: int | None = field(default=None, metadata=_help("parameters of the whole model"))
    fit: Mapping[str, Any] | None = field(default=None, metadata=_help("seconds, best epoch and per-epoch history"))
    sha256: str | None = field(default=None, metadata=_help("sha256 of the weights file, set when saved"))
    created_at: str | None = field(default=None, metadata=_help("UTC time of the save, ISO 8601"))
    format_version: int = field(default=FORMAT_VERSION, metadata=_help("version of this file's layout"))
    extra: Mapping[str, Any] = field(
        default_factory=dict, metadata=_help("keys this code does not know, kept to be written back unchanged")
    )

    def __post_init__(self) -> None:
        shadowed = sorted(set(self.extra) & ({f.name for f in fields(self)} | {"kind", "num_classes"}))
        if shadowed:
            raise ValueError(f"extra must hold unknown keys only; {', '.join(shadowed)} are fields")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def scores(self, split: str) -> Mapping[str, Any]:
        """The metrics of one evaluation split (`test` of a pretrained model; `target_test`, `source_test` of an
        adapted one); {} when it was not evaluated."""
        return self.metrics.get(split) or {}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        return {**_plain(self.extra), **out, "kind": self.kind, "num_classes": self.num_classes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> Self:
        """Parse a file's JSON object; `source` (default: the file name) is what error messages call it."""
        source = source or cls.file
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{source} must contain a JSON object, got {type(data).__name__}")
        for key in cls.required:
            if data.get(key) is None:
                raise ArtifactError(f"{source} is missing required key {key!r}")
        if data.get("kind", cls.kind) != cls.kind:
            raise ArtifactError(f"{source} has kind {data['kind']!r}, expected {cls.kind!r}")
        known = {f.name for f in fields(cls)} - {"extra"}
        # null reads as missing: the field's default (a file never needs null where a default exists)
        values = {name: cls._field(name, data[name], source) for name in known if data.get(name) is not None}
        if "num_classes" in data and data["num_classes"] != len(values["classes"]):
            raise ArtifactError(
                f"{source} says num_classes {data['num_classes']!r} but lists {len(values['classes'])} classes"
            )
        extra = {k: v for k, v in data.items() if k not in known | {"kind", "num_classes"}}
        return cls(**values, extra=extra)

    @classmethod
    def _field(cls, name: str, value: Any, source: str | Path) -> Any:
        parse = cls._parse.get(name)
        if parse is None:
            return value
        try:
            return parse(value)
        except (TypeError, ValueError) as err:
            reason = str(err) if isinstance(err, _Invalid) else f"is not valid: {value!r}"
            raise ArtifactError(f"{source}: {name!r} {reason}") from None

    @classmethod
    def from_json(cls, text: str, source: str | Path | None = None) -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{source or cls.file} is not valid JSON: {err}") from None
        return cls.from_dict(data, source)

    @classmethod
    def read(cls, directory: str | Path) -> Self:
        """The metadata file of the artifact at `directory`."""
        path = Path(directory) / cls.file
        return cls.from_dict(read_json(path), path)


@dataclass(frozen=True, kw_only=True)
class ModelMeta(_Meta):
    """model.json: everything needed to rebuild a full model (backbone + head) and to preprocess its inputs."""

    kind: ClassVar[str] = "model"
    file: ClassVar[str] = MODEL_META
    required: ClassVar[tuple[str, ...]] = ("backbone", "classes", "preprocessing")
    _parse: ClassVar[dict[str, Callable[[Any], Any]]] = {**_Meta._parse, "preprocessing": _preprocessing}

    backbone: str = field(metadata=_help("catalog name of the backbone (models/catalog.py)"))
    preprocessing: Preprocessing = field(metadata=_help("the one transform training, evaluation and serving use"))
    name: str | None = field(default=None, metadata=_help("directory name it was saved under"))

    @property
    def model_id(self) -> str:
        """`backbone@sha12`, the base model's identity: adapters record it and refuse to load onto any other."""
        if not self.sha256:
            raise ArtifactError(f"{self.file} of this {self.backbone} has no sha256: it was never saved")
        return f"{self.backbone}@{self.sha256[:12]}"

    @classmethod
    def for_model(cls, model: Classifier, *, classes: Sequence[str], preprocessing: Preprocessing,
                  **recipe: Any) -> ModelMeta:
        """The one builder of model metadata: backbone from `model`; `recipe` holds the optional fields."""
        if model.num_classes != len(classes):
            raise ValueError(f"the model has {model.num_classes} outputs but {len(classes)} classes were given")
        return cls(backbone=model.spec_name, classes=tuple(classes), preprocessing=preprocessing, **recipe)


@dataclass(frozen=True, kw_only=True)
class AdapterMeta(_Meta):
    """metadata.json of a LoRA adapter: the base it fits, its classes, how it was trained and scored."""

    kind: ClassVar[str] = "adapter"
    file: ClassVar[str] = ADAPTER_META
    required: ClassVar[tuple[str, ...]] = ("base_model", "classes")

    base_model: str = field(metadata=_help("model_id of the base it was trained on; it loads onto no other"))
    backbone: str | None = field(default=None, metadata=_help("the base's backbone"))
    preprocessing: Mapping[str, Any] | None = field(
        default=None, metadata=_help("the base's preprocessing, copied for readers of this file alone; "
                                     "serving always uses the base model's")
    )

    @classmethod
    def for_base(cls, base: ModelMeta, *, strategy: str = "lora", classes: Sequence[str] | None = None,
                 parent: str | None = None, **recipe: Any) -> AdapterMeta:
        """The one builder of adapter metadata: identity, backbone, preprocessing (and by default classes and
        parent) from the base it is trained on; `recipe` holds the other optional fields."""
        return cls(
            base_model=base.model_id,
            backbone=base.backbone,
            classes=tuple(base.classes if classes is None else classes),
            preprocessing=_plain(base.preprocessing),
            strategy=strategy,
            parent=parent or base.model_id,
            **recipe,
        )
