"""Which captured predictions are most worth a label: margin sampling, then k-center greedy over the embeddings.

Uncertainty alone picks near-duplicates (a shifted site sends many similar images the model hesitates on), and
diversity alone spends labels on images the model already gets right. `select` does both, as Cluster-Margin
(Citovsky et al., NeurIPS 2021) does at scale:

1. margin sampling (Scheffer et al., 2001): keep the `pool_factor * n` predictions with the smallest top-1 minus
   top-2 probability, the ones the model hesitates on;
2. k-center greedy (Sener & Savarese, ICLR 2018) over their L2-normalised penultimate-layer embeddings: repeatedly
   take the candidate farthest from everything chosen or already labelled, so the n requests cover different
   regions of the shifted inputs instead of n copies of one.

Pure numpy, no storage: service/label_requests.py reads the candidates and the labelled embeddings from the state
database and calls `select`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_POOL_FACTOR = 4


@dataclass(frozen=True)
class Selection:
    """The chosen candidates' indices in pick order, with why: each one's margin and its distance (cosine, on
    normalised embeddings: 0..2) to the nearest labelled or earlier pick when it was taken (inf for the first pick
    when nothing was labelled)."""

    indices: np.ndarray
    margins: np.ndarray
    distances: np.ndarray
    pool: int  # candidates left after the margin step


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def k_center_greedy(
    embeddings: np.ndarray, n: int, centers: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n row indices of `embeddings`, each the row farthest (Euclidean) from the nearest of `centers` and the rows
    taken before it; with no centers the first pick is row 0 (callers order rows so that row 0 is the best
    start). Returns (indices, the distance each had when taken). O(n x rows x d)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = min(int(n), len(x))
    if n <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    nearest = np.full(len(x), np.inf)
    if centers is not None and len(centers):
        c = np.asarray(centers, dtype=np.float64)
        sq = (x**2).sum(axis=1)
        for start in range(0, len(c), 1024):  # bounded memory: a rows x 1024 matrix at a time, never rows x c x d
            block = c[start:start + 1024]
            d2 = sq[:, None] + (block**2).sum(axis=1)[None, :] - 2.0 * (x @ block.T)
            nearest = np.minimum(nearest, np.sqrt(np.maximum(d2, 0.0)).min(axis=1))
    picks, distances = [], []
    for _ in range(n):
        i = 0 if np.isinf(nearest).all() else int(np.argmax(nearest))
        picks.append(i)
        distances.append(float(nearest[i]))
        nearest = np.minimum(nearest, np.linalg.norm(x - x[i], axis=1))
        nearest[i] = -1.0  # never again
    return np.asarray(picks, dtype=np.int64), np.asarray(distances)


def select(
    embeddings: np.ndarray,
    margins: np.ndarray,
    n: int,
    labelled: np.ndarray | None = None,
    pool_factor: int = DEFAULT_POOL_FACTOR,
) -> Selection:
    """The n candidates most worth labelling: the pool_factor x n smallest margins, then k-center greedy over their
    normalised embeddings with the `labelled` embeddings as the centers already covered. Candidates whose
    embedding or margin is not finite are never chosen."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    x = np.asarray(embeddings, dtype=np.float64)
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    if len(x) != len(m):
        raise ValueError(f"got {len(x)} embeddings and {len(m)} margins; pass one of each per candidate")
    finite = np.flatnonzero(np.isfinite(m) & (np.isfinite(x).all(axis=1) if x.size else True))
    order = finite[np.argsort(m[finite], kind="stable")]  # most uncertain first
    pool = order[: pool_factor * n]
    centers = None
    if labelled is not None and len(labelled) and len(pool) and np.shape(labelled)[1] == x.shape[1]:
        centers = _normalised(np.asarray(labelled)[np.isfinite(labelled).all(axis=1)])
    picks, distances = k_center_greedy(_normalised(x[pool]) if len(pool) else x[:0], n, centers)
    chosen = pool[picks]
    return Selection(indices=chosen, margins=m[chosen], distances=distances, pool=len(pool))
