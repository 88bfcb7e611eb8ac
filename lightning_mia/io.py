"""Atomic file writes: temp file in the same directory, fsync, rename over the target.

A kill at any moment leaves the old file or the new one, never half of one. The rename replaces a symlink at
``path`` instead of writing through it, and the file gets the mode every other file gets (``0666 & ~umask``),
not ``mkstemp``'s private 0600.

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a", "b.txt")
    >>> atomic_write_text(p, "hello")
    >>> open(p).read()
    'hello'
"""
from __future__ import annotations

import os
import tempfile
from typing import Any


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename (atomic on POSIX)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """UTF-8 text through :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_figure(fig: Any, path: str, **savefig_kwargs: Any) -> None:
    """Render a matplotlib figure in memory with the Agg canvas, then write it with :func:`atomic_write_bytes`.

    ``fig.savefig(path)`` opens ``path`` for writing: it follows a symlink placed there and overwrites the link's
    target, and a kill mid-write leaves half a PNG. Here the bytes are complete before the file exists, and the
    rename replaces a link at ``path`` instead of writing through it. The format follows the extension (``.png``
    by default); ``savefig_kwargs`` go to ``savefig`` (``dpi``, ``bbox_inches``, ...).

    Example:
        >>> import tempfile, os, matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> fig = plt.figure(); _ = fig.gca().plot([0, 1])
        >>> p = os.path.join(tempfile.mkdtemp(), "figures", "f.png")
        >>> atomic_save_figure(fig, p); plt.close(fig)
        >>> open(p, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ext = os.path.splitext(path)[1].lstrip(".").lower()
    savefig_kwargs.setdefault("format", ext or "png")
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)  # attaches itself: rendering needs no display and no GUI backend
    buf = io.BytesIO()
    fig.savefig(buf, **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())
