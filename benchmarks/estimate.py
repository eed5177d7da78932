"""`adaptserve bench drift`'s estimated-accuracy phase: how far the accuracy the monitor estimates without labels
(monitoring/accuracy.py) is from the true accuracy, on every shift and severity of pipelines/shifts.py.

The estimator is the one the base model's drift reference carries, calibrated on its labelled holdout under generic
corruptions only; the cases are the validation split (which the calibration never saw), clean and under each bench
shift, through the serving engine as traffic would be. The mean confidence, the usual label-free proxy, is scored
beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monitoring.accuracy import read_estimator
from pipelines.data import digits_splits
from pipelines.policy import DriftPolicy
from pipelines.shifts import shift_set

ALL_SEVERITIES = (1, 2, 3, 4, 5)


def estimate_errors(traffic: Any, reference: Path, shifts: Sequence[str], severities: Sequence[int] = ALL_SEVERITIES,
                    seed: int = 0) -> dict[str, Any]:
    """`estimated_acc_mae` (and its max, and the mean confidence's) over clean + shifts x severities, with the
    per-case numbers under `estimated_accuracy`."""
    estimator = read_estimator(reference)
    if estimator is None:
        return {"estimated_acc_mae": None, "estimated_accuracy": None,
                "estimated_acc_note": f"{reference} carries no accuracy estimator (ADAPTSERVE_ACCURACY_CALIBRATION_"
                                      "IMAGES=0, or a base model without samples/holdout.npz)"}
    val = digits_splits(traffic.meta.preprocessing.crop_size, seed=0).val
    cases = [("clean", 0, val)] + [(name, s, shift_set(val, name, s, seed=seed + 10 * s))
                                   for name in shifts for s in severities]
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    errors, conf_errors = [], []
    # what the retrain policy makes of each window (ADAPTSERVE_RETRAIN_MIN_DROP; no labels, so the estimate decides)
    policy = DriftPolicy(Path("."), measured=lambda adapter, version: {"accuracy": None, "labels": 0})
    for name, severity, data in cases:
        window = traffic.features(data.images)
        truth = float(np.mean(window.classes == np.asarray(data.labels)))
        estimate = estimator.estimate(window.confidence, window.classes)
        errors.append(abs(float(estimate["estimated_accuracy"]) - truth))
        conf_errors.append(abs(float(estimate["mean_confidence"]) - truth))
        drop = policy.accuracy_drop({"adapter": "base", "version": 0, "accuracy_estimate": estimate})
        per_case.setdefault(name, {})[str(severity)] = {
            "true": round(truth, 4), "estimated": estimate["estimated_accuracy"],
            "mean_confidence": estimate["mean_confidence"], "class_bound": estimate["class_bound"],
            "job": drop is not None and drop[0] >= policy.min_drop}
    return {"estimated_acc_mae": round(float(np.mean(errors)), 4),
            "estimated_acc_max_error": round(float(np.max(errors)), 4),
            "mean_confidence_mae": round(float(np.mean(conf_errors)), 4),
            "estimated_acc_cases": len(cases), "estimated_acc_calibration_mae": round(estimator.fit_mae, 4),
            "policy_min_drop": policy.min_drop,
            "estimated_accuracy": per_case}


def markdown(result: dict[str, Any]) -> list[str]:
    """The results section of drift.md."""
    per_case = result.get("estimated_accuracy")
    if not per_case:
        return ["", "## Estimated accuracy", "", result.get("estimated_acc_note", "not measured")]
    lines = [
        "", "## Estimated accuracy (no labels)", "",
        f"Over {result['estimated_acc_cases']} cases (the validation split, clean and every shift x severity): mean "
        f"absolute error **{result['estimated_acc_mae'] * 100:.1f} points** (max "
        f"{result['estimated_acc_max_error'] * 100:.1f}; target <= 3); the mean confidence as the estimate: "
        f"{result['mean_confidence_mae'] * 100:.1f} points. Calibrated on the holdout under generic corruptions "
        f"only (fit error there {result['estimated_acc_calibration_mae'] * 100:.1f} points).", "",
        f"`job`: whether the retrain policy starts a job on this window (accuracy estimated >= "
        f"{result['policy_min_drop']:g} points below the holdout's, ADAPTSERVE_RETRAIN_MIN_DROP, given enough "
        "labels). The detection table above flags these shifts as drift; the ones that cost no accuracy start no job.",
        "",
        "| case | true | estimated | mean confidence | class bound | job |", "|---|---:|---:|---:|---:|---|",
    ]
    for name, by_severity in per_case.items():
        for severity, c in by_severity.items():
            label = name if name == "clean" else f"{name} @{severity}"
            lines.append(f"| {label} | {c['true']:.3f} | {c['estimated']:.3f} | {c['mean_confidence']:.3f} | "
                         f"{c['class_bound']:.3f} | {'yes' if c['job'] else 'no'} |")
    return lines
