"""The course's exercise as a command: every strategy on the same source model and the same target data."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from models.artifacts import load_model
from models.strategies import STRATEGIES, AdaptConfig
from pipelines.adapt import AdaptResult, adapt_model
from pipelines.data import DataSplits, digits_splits, per_class_subset
from pipelines.evaluate import evaluate
from pipelines.shifts import shift_splits
from pipelines.train import TrainConfig


@dataclass
class CompareConfig:
    shift: str = field(
        default="gaussian_noise", metadata={"help": "domain shift of the default target (pipelines/shifts.py)"}
    )
    severity: int = field(default=5, metadata={"help": "shift severity 1..5"})
    per_class: int = field(default=5, metadata={"help": "labelled target images per class for training"})
    epochs: int = field(default=15, metadata={"help": "maximum epochs per strategy"})
    seed: int = field(default=0, metadata={"help": "seed for data selection and training"})
    strategies: tuple[str, ...] = STRATEGIES


def default_target(cfg: CompareConfig) -> tuple[DataSplits, DataSplits]:
    """(target, source): shifted digits with few labels per class, and the clean source splits."""
    source = digits_splits(32, seed=0)
    shifted = shift_splits(source, cfg.shift, cfg.severity, seed=cfg.seed)
    target = DataSplits(per_class_subset(shifted.train, cfg.per_class, cfg.seed), shifted.val, shifted.test)
    return target, source


def run_compare(
    base_dir: Path,
    out_dir: Path,
    cfg: CompareConfig,
    target: DataSplits | None = None,
    source: DataSplits | None = None,
    adapt_overrides: dict[str, Any] | None = None,
    progress=None,
) -> list[dict]:
    if target is None:
        target, source = default_target(cfg)
    rows = [no_adaptation_row(base_dir, target, source)]
    for strategy in cfg.strategies:
        adapt_cfg = replace(AdaptConfig(strategy=strategy), **(adapt_overrides or {}))
        train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=32, seed=cfg.seed, patience=cfg.epochs)
        result: AdaptResult = adapt_model(
            base_dir, target, out_dir / "artifacts" / strategy, adapt_cfg, train_cfg, source, progress=progress
        )
        rows.append(result.summary())
    return rows


def no_adaptation_row(base_dir: Path, target: DataSplits, source: DataSplits | None) -> dict:
    """The source model as it is, on the target: how much the domain shift costs before any adaptation."""
    model, meta = load_model(base_dir)
    prep = meta.preprocessing
    same = tuple(target.classes) == meta.classes
    tgt = evaluate(model, target.test.with_transform(prep.eval_transform()), target.classes) if same else None
    src = evaluate(model, source.test.with_transform(prep.eval_transform()), source.classes) if source else None
    total = sum(p.numel() for p in model.parameters())
    return {
        "strategy": "no-adaptation",
        "trainable_params": 0,
        "total_params": total,
        "trainable_pct": 0.0,
        "train_seconds": 0.0,
        "epochs_run": 0,
        "best_epoch": -1,
        "out": str(base_dir),
        "target": tgt.summary() if tgt else None,
        "source": src.summary() if src else None,
    }


def check_expectations(rows: list[dict]) -> list[dict]:
    """The course's claims about transfer, each checked against this run's numbers."""
    by = {r["strategy"]: r for r in rows if r["strategy"] != "no-adaptation"}
    acc = {k: r["target"]["accuracy"] for k, r in by.items()}
    checks = []
    if "scratch" in acc:
        for k in acc:
            if k != "scratch":
                checks.append(
                    {
                        "claim": f"{k} beats scratch",
                        "ok": acc[k] > acc["scratch"],
                        "numbers": f"{acc[k]:.3f} vs {acc['scratch']:.3f}",
                    }
                )
    if {"lora", "feature-extraction"} <= acc.keys():
        checks.append(
            {
                "claim": "lora beats feature-extraction",
                "ok": acc["lora"] > acc["feature-extraction"],
                "numbers": f"{acc['lora']:.3f} vs {acc['feature-extraction']:.3f}",
            }
        )
    if {"lora", "finetune"} <= acc.keys():
        checks.append(
            {
                "claim": "lora within 1 point of finetune",
                "ok": acc["lora"] >= acc["finetune"] - 0.01,
                "numbers": f"{acc['lora']:.3f} vs {acc['finetune']:.3f}",
            }
        )
    if "lora" in by:
        pct = by["lora"]["trainable_pct"]
        checks.append(
            {"claim": "lora trains at most 5% of the parameters", "ok": pct <= 5.0, "numbers": f"{pct:.2f}%"}
        )
    return checks


def reading_notes(rows: list[dict]) -> list[str]:
    """Plain-language notes on what this run's numbers say (domain shift, forgetting, negative transfer)."""
    by = {r["strategy"]: r for r in rows}
    notes = []
    base = by.get("no-adaptation")
    if base and base["target"] and base["source"]:
        drop = base["source"]["accuracy"] - base["target"]["accuracy"]
        notes.append(f"- Domain shift: the unadapted source model loses {100 * drop:.1f} points on the target.")
        for k, r in by.items():
            if k not in ("no-adaptation", "scratch") and r["target"]["accuracy"] < base["target"]["accuracy"]:
                notes.append(
                    f"- Negative transfer: `{k}` ends below the unadapted model on the target "
                    f"({_fmt(r['target']['accuracy'])} vs {_fmt(base['target']['accuracy'])}): too few labels for "
                    "what it trains (e.g. a fresh head on frozen features cannot undo a low-level shift)."
                )
        for k, r in by.items():
            if k != "no-adaptation" and r["source"]:
                lost = base["source"]["accuracy"] - r["source"]["accuracy"]
                if lost > 0.05:
                    notes.append(f"- Forgetting: `{k}` loses {100 * lost:.1f} points on the clean source test set.")
    notes.append(
        "- `source acc % after` evaluates each adapted model on the clean source test split; retraining in "
        "production replays source data to keep that loss small."
    )
    return notes


def _fmt(x: float | None, pct: bool = True) -> str:
    return "n/a" if x is None else (f"{100 * x:.1f}" if pct else f"{x:.3f}")


def write_report(rows: list[dict], cfg: CompareConfig, out_dir: Path, base: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = check_expectations(rows)
    payload = {
        "config": {**cfg.__dict__, "strategies": list(cfg.strategies)},
        "base_model": base,
        "machine": platform.machine(),
        "rows": rows,
        "checks": checks,
    }
    json_path = out_dir / "compare.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Transfer strategies compared",
        "",
        f"Source model `{base}`; target: digits with `{cfg.shift}` severity {cfg.severity}, {cfg.per_class} labelled "
        f"images per class for training, the full shifted val/test splits for selection/evaluation; "
        f"{cfg.epochs} epochs max, seed {cfg.seed}.",
        "Produced by `adaptserve compare`.",
        "",
        "| strategy | trainable params | % | train s | target acc % | target macro-F1 % | source acc % after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        src = r["source"]["accuracy"] if r["source"] else None
        tgt = r["target"] or {}
        lines.append(
            f"| {r['strategy']} | {r['trainable_params']:,} | {r['trainable_pct']:.2f} | {r['train_seconds']:.1f} | "
            f"{_fmt(tgt.get('accuracy'))} | {_fmt(tgt.get('f1'))} | {_fmt(src)} |"
        )
    lines += ["", "## Expectations", ""] + [
        f"- [{'x' if c['ok'] else ' '}] {c['claim']}: {c['numbers']}" for c in checks
    ]
    failed = [c for c in checks if not c["ok"]]
    lines += [
        "",
        "All expectations hold."
        if not failed
        else f"{len(failed)} expectation(s) failed on this run; see docs/strategies.md for why this can happen "
        "(few labels, short schedules, a shift the frozen features cannot absorb).",
    ]
    lines += ["", "## Reading it", ""] + reading_notes(rows)
    md_path = out_dir / "compare.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path
