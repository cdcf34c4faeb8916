"""What every stage shares for files and the console: atomic writes, hashing, safe names, console logging.

An atomic write goes to a hidden temporary file beside the target (prefix ``.tmp-``), is flushed and
fsynced, then renamed over the target: a reader sees the old file or the new one, never half of one,
and a crash leaves only a temporary that ``remove_temporaries`` clears. Library code only logs
(``logging.getLogger(__name__)``); ``log_to_console`` (each stage's ``main``, and Ray actors) shows the
``dprec`` records as plain lines on the *current* stdout (below WARNING) and stderr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def atomic_write_with(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, fsync it, rename it onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write_with(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def remove_temporaries(folder: str | Path) -> int:
    """Delete the temporary files an interrupted atomic write left in ``folder``; returns how many."""
    stale = [p for p in Path(folder).glob(f"{TMP_PREFIX}*") if p.is_file()]
    for p in stale:
        p.unlink()
    return len(stale)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def safe_name(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_`` (folders, registry names)."""
    return _UNSAFE_NAME_CHARS.sub("_", name)


class _ConsoleHandler(logging.Handler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is when a record arrives (captures are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must not raise into the caller
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> None:
    """Show the ``dprec`` loggers' records at ``level`` and above on the console, message only (idempotent)."""
    logger = logging.getLogger("dprec")
    logger.setLevel(level)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
