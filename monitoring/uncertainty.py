"""How unsure one prediction is, from its probabilities: top-1 confidence, entropy and the top-2 margin. Computed for
every captured prediction (monitoring.capture) and every reference row, exactly the same way."""

from __future__ import annotations

import numpy as np


def entropy_and_confidence(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 confidence, entropy in nats) per row of an (n, classes) probability array; a 1-d array is one row.

    Returns two float64 (n,) arrays. Zero probabilities contribute 0 to the entropy (0 log 0 = 0).
    """
    p = np.asarray(probs, dtype=np.float64)
    p = p.reshape(1, -1) if p.ndim == 1 else p
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"probs must be (n, classes) probabilities, got shape {np.shape(probs)}; "
                         "apply softmax to the logits first.")
    logp = np.log(np.where(p > 0.0, p, 1.0))  # log 1 = 0 where p == 0
    entropy = -np.einsum("ij,ij->i", p, logp)
    return p.max(axis=1), np.maximum(entropy, 0.0)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row of an (n, classes) array (1.0 with a single class): small where the
    model hesitates between two classes, the uncertainty margin sampling ranks by (Scheffer et al., 2001)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p.reshape(1, -1) if p.ndim == 1 else p
    if p.shape[1] < 2:
        return np.ones(len(p))
    top = np.partition(p, -2, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]
