"""LoRA adaptation through Hugging Face peft, with a depth policy per backbone.

Policies: `head` (LoRA on the source head only; the class set must be unchanged), `late` (last stage),
`half` (the output-side half of the stages), `all` (every stage). Except for `head`, the new head is
trained in full (peft `modules_to_save`), and with `lora_norms` the norm layers of the adapted stages are
too: each adapter then carries its own normalisation statistics for its domain, so adapters never
disturb the shared base model nor each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from models.adaptation import Adaptation, AdaptConfig
from models.classifier import Classifier, stage_of

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# Norm layers an adapter may own (lora_norms): their statistics are per domain.
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _adapted_stages(n: int, policy: str) -> range:
    return {"head": range(0), "late": range(n - 1, n), "half": range(n // 2, n), "all": range(n)}[policy]


def lora_targets(model: Classifier, policy: str) -> tuple[list[str], list[str]]:
    """(LoRA target module names, norm module names) for `policy`, full dotted names in `model`."""
    spec = model.spec
    stages = set(_adapted_stages(len(spec.stages), policy))
    targets: list[str] = []
    norms: list[str] = []
    for name, module in model.named_modules():
        stage = stage_of(name + ".w", spec)
        if stage is None or stage not in stages or any(x in name for x in spec.lora_exclude):
            continue
        if isinstance(module, _NORM_TYPES):
            norms.append(name)
        elif isinstance(module, spec.lora_layer_types) and getattr(module, "groups", 1) == 1:
            # Depthwise/grouped convolutions have tiny weights already; LoRA would not save anything.
            targets.append(name)
    if policy == "head":
        targets = ["head.1"]
    return targets, norms


def lora_config(model: Classifier, cfg: AdaptConfig) -> LoraConfig:
    from peft import LoraConfig  # heavy (transformers, ~2.5 s): only building or loading an adapter pays it

    targets, norms = lora_targets(model, cfg.lora_targets)
    save = [] if cfg.lora_targets == "head" else ["head"]
    if cfg.lora_norms:
        save += norms
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=save or None,
        base_model_name_or_path=model.spec_name,
    )


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def lora(model: Classifier, cfg: AdaptConfig, num_classes: int, keep_head: bool = False) -> Adaptation:
    """Wrap `model` with a LoRA adapter. The base weights stay untouched (the head too, when the class set
    is unchanged): the adapter's own copy of the head is what trains, so the base keeps serving others."""
    from peft import get_peft_model  # heavy: see lora_config

    if cfg.lora_targets == "head" and num_classes != model.num_classes:
        raise ValueError("LoRA policy 'head' adapts the source head, so the target must keep the source classes")
    if num_classes != model.num_classes:
        model.reset_head(num_classes)
    config = lora_config(model, cfg)
    n_targets = len(config.target_modules)  # before peft compresses the list into suffixes
    model.name_or_path = model.spec_name  # recorded as base_model_name_or_path in adapter_config.json
    peft_model = get_peft_model(model, config)
    if not keep_head and cfg.lora_targets != "head":
        _reset(peft_model.base_model.model.head.modules_to_save["default"])
    groups: dict[str, list[nn.Parameter]] = {"lora": [], "head": [], "norms": []}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            groups["lora" if "lora_" in name else "head" if ".head." in name else "norms"].append(param)
    lrs = {"lora": cfg.lora_lr, "head": cfg.lr_head, "norms": cfg.lora_lr}
    param_groups = [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]
    notes = {"target_modules": n_targets, "modules_to_save": len(config.modules_to_save or [])}
    return Adaptation(peft_model, param_groups, "lora", notes=notes)


def load_adapter(base: Classifier, adapter_dir: str, adapter_name: str = "default") -> PeftModel:
    """The base model with a saved adapter applied, ready for inference."""
    from peft import PeftModel  # heavy: see lora_config

    return PeftModel.from_pretrained(base, adapter_dir, adapter_name=adapter_name, is_trainable=False)
