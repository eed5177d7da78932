"""How far a label's sender is trusted, and the one rule for when two labels of the same image disagree.

`Trust` orders senders (anonymous feedback < a trusted labeller or an import < an admin); `decide` is the conflict
rule the label store applies (`pipelines.labels`): a higher-trust label replaces the stored one (an admin's always
does); the same trust (below admin) keeps the stored label and leaves a pending conflict that keeps the example out
of training and of the holdout; a lower-trust label is refused and filed as outranked.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

OUTCOMES = ("added", "same", "relabelled", "conflict")


class Trust(IntEnum):
    """How far the sender of a label is trusted; the service maps its token roles onto these levels."""

    UNTRUSTED = 0  # anonymous POST /feedback, a non-trusted labeller (contributor) token
    TRUSTED = 1  # `adaptserve data add` (import_folder), a trusted labeller token
    ADMIN = 2  # an admin token: an admin's correction is authoritative


def trust_name(level: int) -> str:
    """'untrusted', 'trusted' or 'admin': how trust levels are shown (JSON, summaries)."""
    return Trust(level).name.lower()



@dataclass(frozen=True)
class Decision:
    """How an offered label meets the stored label of the same example (see `decide`)."""

    outcome: str  # same | relabelled | conflict
    replace: bool  # the offered label becomes the stored one
    trust: Trust  # the stored label's trust afterwards
    filed: str | None  # the contradiction's row in `conflicts`: pending | outranked | replaced; None: none
    settles: bool  # the example's pending conflicts are resolved by this label


def decide(kept: str, kept_trust: Trust, offered: str, offered_trust: Trust) -> Decision:
    """The conflict rules in one pure function.

    The same label again: trust becomes the higher of the two (a higher one settles pending conflicts). A different
    label: higher trust replaces, and an admin's always does; the same trust (below admin) keeps the stored label
    and leaves a pending conflict (the example is unusable until settled); lower trust keeps the stored label and
    is filed as outranked (the example stays usable)."""
    if offered == kept:
        return Decision("same", False, max(kept_trust, offered_trust), None, offered_trust > kept_trust)
    if offered_trust > kept_trust or offered_trust == Trust.ADMIN:
        return Decision("relabelled", True, offered_trust, "replaced", True)
    return Decision("conflict", False, kept_trust, "pending" if offered_trust == kept_trust else "outranked", False)
