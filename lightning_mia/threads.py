"""Thread-pool limits for the audit's native libraries, cheap to enter.

The learned attacks cap the BLAS threads (numpy's / scipy's OpenBLAS) while they fit and score: their matrices are
small, and a multi-threaded OpenBLAS call leaves a worker thread busy-waiting for the next call (measured here:
0.06 s of CPU after an MLP fit without the cap, none with it), which on a 2-core machine takes a core from the
training that resumes next.

``threadpoolctl.threadpool_limits`` finds the libraries by scanning every loaded shared object on each call (about
3 ms, 2 ms of CPU, per fit and per score on our 2-core machines); :func:`blas_limits` keeps one controller while
the process and its set of imported modules stay the same (0.03 ms per block).

Only the main thread changes the limits. The limits are process-wide, and OpenBLAS (0.3.31, numpy's and scipy's
wheels) ignores ``openblas_set_num_threads`` from any other thread once the main thread has set a count, so a
block opened in a worker thread (``Auditor(n_jobs > 1)`` fits attacks in threads) could neither set the cap nor
restore the limits after it; there the block does nothing, and the caller caps the threads around its pool
from the main thread instead. Blocks nest: the limits found before the outermost block come back when it closes.

Example:
    >>> import numpy  # loads a BLAS library
    >>> with blas_limits(1):
    ...     inside = blas_thread_counts()
    >>> all(n == 1 for n in inside.values())
    True
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Dict, Iterator, Optional

__all__ = ["blas_limits", "blas_thread_counts"]

_controller: Any = None
_controller_key: Optional[tuple] = None


def _blas_controller() -> Any:
    """A ``ThreadpoolController`` of the loaded BLAS libraries, rebuilt after a fork or once a module has been
    imported since (an import may load another BLAS library)."""
    global _controller, _controller_key
    if _controller is None or _controller_key != (os.getpid(), len(sys.modules)):
        from threadpoolctl import ThreadpoolController  # a scikit-learn dependency

        _controller = ThreadpoolController().select(user_api="blas")
        _controller_key = (os.getpid(), len(sys.modules))  # after the import above
    return _controller


def blas_thread_counts() -> Dict[str, int]:
    """``{library path: threads}`` of every loaded BLAS library (what :func:`blas_limits` changes)."""
    return {lib.filepath: int(lib.num_threads) for lib in _blas_controller().lib_controllers}


@contextlib.contextmanager
def blas_limits(limit: Optional[int]) -> Iterator[None]:
    """Cap every loaded BLAS library at ``limit`` threads inside the block, then restore the limits found before.

    ``None``, or a block opened outside the main thread, leaves the limits alone (see the module's doc).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if limit is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    limiter = _blas_controller().limit(limits=limit)
    try:
        yield
    finally:
        limiter.restore_original_limits()
