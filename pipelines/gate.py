"""The gate: a challenger replaces the champion only when it is better where it must be and no worse where it was.

`gate(numbers, cfg)` reads the four holdout accuracies a retrain job measured (challenger and champion, on the
trusted target holdout and on the source holdout) and returns (passed, reason). The reason is a sentence with both
comparisons in points: it is what a rejected job reports. Thresholds: ADAPTSERVE_RETRAIN_MARGIN (the target gain
a challenger needs) and ADAPTSERVE_RETRAIN_MAX_SOURCE_DROP (the forgetting it may cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config is the job's; the gate only reads two of its numbers
    from pipelines.retrain import RetrainConfig


def gate(numbers: dict[str, Any], cfg: RetrainConfig) -> tuple[bool, str]:
    """(passed, reason): beat the champion on the target holdout by `margin` points, lose at most
    `max_source_drop` points on the source holdout."""
    gain = 100 * (numbers["challenger_target_acc"] - numbers["champion_target_acc"])
    drop = 100 * (numbers["champion_source_acc"] - numbers["challenger_source_acc"])
    numbers.update(target_gain_points=round(gain, 2), source_drop_points=round(drop, 2))
    target = (
        f"target holdout {100 * numbers['challenger_target_acc']:.1f}% vs champion "
        f"{100 * numbers['champion_target_acc']:.1f}% ({gain:+.1f} points, needs >= +{cfg.margin:g} and > 0)"
    )
    source = (
        f"source holdout {100 * numbers['challenger_source_acc']:.1f}% vs champion "
        f"{100 * numbers['champion_source_acc']:.1f}% ({-drop:+.1f} points, may lose at most {cfg.max_source_drop:g})"
    )
    fails = [
        s for s, ok in ((target, gain >= cfg.margin and gain > 0), (source, drop <= cfg.max_source_drop)) if not ok
    ]
    if fails:
        return False, "rejected: " + "; ".join(fails)
    return True, f"promoted: {target}; {source}"
