"""numpy's BLAS on one thread for the duration of a drift check or a detector fit."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any

from threadpoolctl import ThreadpoolController

_blas: ThreadpoolController | None = None  # the BLAS libraries loaded in this process
_blas_lock = threading.Lock()


def one_blas_thread() -> AbstractContextManager[Any]:
    """Context manager: numpy's BLAS (OpenBLAS) on one thread, for a drift check or a detector fit.

    A check is a few small GEMMs; two BLAS threads on two cores that also serve inference spend more time
    synchronising than computing (measured on 2 busy cores: 200 ms per 1000 x 512 check with 2 threads, 50-60 ms
    with 1), and one thread leaves the other core to serving. The limit is process-wide while it lasts (OpenBLAS
    has one setting); serving uses ONNX Runtime's and torch's own thread pools, not numpy's. ~50 us to enter.
    """
    global _blas
    with _blas_lock:
        if _blas is None:  # on first use, not at import: the controller inspects every loaded native library
            _blas = ThreadpoolController().select(user_api="blas")
    return _blas.limit(limits=1)
