"""Label requests: the captured predictions of an adapter most worth a label, with their images (GET /labels/requests,
`adaptserve labels requests`).

A candidate is a captured prediction (monitoring.capture: embedding, confidence, margin) whose input the feedback
cache still keeps (service.inputs: the pixels a label by id needs) and that nobody labelled yet; the ones already
labelled are the centers that diversity is measured against. monitoring.selection picks: smallest margins first,
then k-center greedy over the embeddings. A label sent for a request is an ordinary `POST /feedback {"id", "label"}`:
it counts like any other, and the next request list no longer offers it.

Both stores live in the state database, so one query finds the candidates of every replica on a shared
ADAPTSERVE_DATABASE_URL.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select

from models.db import Database
from monitoring.selection import DEFAULT_POOL_FACTOR
from monitoring.selection import select as select_requests
from monitoring.tables import capture_records
from pipelines.label_db import labels
from pipelines.label_images import encode_png
from service.inputs import InputCache, feedback_inputs

MAX_REQUESTS = 500
DEFAULT_CANDIDATES = 5000  # newest candidates read: one adapter's capture bound (ADAPTSERVE_CAPTURE_MAX_PER_ADAPTER)
METHOD = "margin sampling, then k-center greedy over the embeddings (Cluster-Margin style)"
_C, _F, _L = capture_records.c, feedback_inputs.c, labels.c


def _embeddings(rows: Sequence[Any]) -> np.ndarray:
    """(n, d) float32 from (emb_dtype, embedding) rows; rows of another size than the most common one are NaN."""
    vectors = [np.frombuffer(blob, dtype="<" + code).astype(np.float32) for code, blob in rows]
    if not vectors:
        return np.zeros((0, 0), np.float32)
    dim = Counter(len(v) for v in vectors).most_common(1)[0][0]
    out = np.full((len(vectors), dim), np.nan, np.float32)
    for i, v in enumerate(vectors):
        if len(v) == dim:
            out[i] = v
    return out


def _candidates(database: Database, adapter: str, since: float, limit: int) -> list[Any]:
    query = (
        select(_C.prediction_id, _C.version, _C.created_at, _C.label, _C.confidence, _C.margin, _C.emb_dtype,
               _C.embedding)
        .join(feedback_inputs, _F.prediction_id == _C.prediction_id)
        .outerjoin(labels, _L.prediction_id == _C.prediction_id)
        .where(_C.adapter == adapter, _F.png.is_not(None), _F.created_at >= since, _L.id.is_(None))
        .order_by(_C.created_at.desc(), _C.seq.desc())
        .limit(limit)
    )
    with database.read() as conn:
        return list(conn.execute(query).all())


def _labelled(database: Database, adapter: str, limit: int) -> list[Any]:
    query = (
        select(_C.emb_dtype, _C.embedding)
        .join(labels, _L.prediction_id == _C.prediction_id)
        .where(_C.adapter == adapter)
        .order_by(_C.created_at.desc())
        .limit(limit)
    )
    with database.read() as conn:
        return list(conn.execute(query).all())


def _png_base64(cache: InputCache, prediction_id: str) -> str | None:
    try:
        _adapter, _version, image = cache.get(prediction_id)
    except LookupError:  # expired between the query and now
        return None
    return base64.b64encode(encode_png(image, compress_level=1)).decode("ascii")


def label_requests(
    cache: InputCache,
    adapter: str,
    n: int,
    *,
    images: bool = True,
    max_candidates: int = DEFAULT_CANDIDATES,
    pool_factor: int = DEFAULT_POOL_FACTOR,
    now: float | None = None,
) -> dict[str, Any]:
    """`{"adapter", "requests": [{"id", "version", "created_at", "predicted", "confidence", "margin", "distance",
    "image"}], ...}`: the n predictions most worth labelling, in the order they are worth it. `image` is the kept
    input as base64 PNG (absent with images=False). `candidates` says how many there were to choose from,
    `labelled` how many captured predictions already have a label."""
    if not 1 <= n <= MAX_REQUESTS:
        raise ValueError(f"n must be between 1 and {MAX_REQUESTS}, got {n}")
    now = time.time() if now is None else now
    database = cache.database
    rows = _candidates(database, adapter, now - cache.ttl_s, max_candidates)
    labelled = _labelled(database, adapter, max_candidates)
    out: dict[str, Any] = {"adapter": adapter, "method": METHOD, "candidates": len(rows), "labelled": len(labelled),
                           "requests": []}
    if not rows:
        out["note"] = ("no captured prediction of this adapter has a kept input and no label: predictions are "
                       "captured when the drift monitor is on (ADAPTSERVE_MONITOR), inputs are kept for "
                       f"{cache.ttl_s:g} s (ADAPTSERVE_FEEDBACK_TTL_S)")
        return out
    confidence = np.asarray([r.confidence for r in rows], dtype=np.float64)
    margin = np.asarray([np.nan if r.margin is None else r.margin for r in rows], dtype=np.float64)
    margin = np.where(np.isnan(margin), 2.0 * confidence - 1.0, margin)  # rows captured before 0008_capture_margin
    chosen = select_requests(_embeddings([(r.emb_dtype, r.embedding) for r in rows]), margin, n,
                             labelled=_embeddings(labelled) if labelled else None, pool_factor=pool_factor)
    for i, distance in zip(chosen.indices, chosen.distances, strict=True):
        r = rows[int(i)]
        item = {"id": r.prediction_id, "version": int(r.version), "created_at": float(r.created_at),
                "predicted": r.label, "confidence": round(float(r.confidence), 6),
                "margin": round(float(margin[i]), 6),
                "distance": None if not np.isfinite(distance) else round(float(distance), 6)}
        if images:
            png = _png_base64(cache, r.prediction_id)
            if png is None:
                continue
            item["image"] = png
        out["requests"].append(item)
    return out
