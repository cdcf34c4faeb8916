"""What every stage shares for files and the console: atomic writes (files and folders), hashing, safe names, logging.

An atomic write goes to a hidden temporary file beside the target (prefix ``.tmp-``), is flushed and
fsynced, then renamed over the target: a reader sees the old file or the new one, never half of one,
and a crash leaves only a temporary that ``remove_temporaries`` clears. ``atomic_write_folder`` does
the same for a whole folder (a hidden sibling, renamed into place). Library code only logs
(``logging.getLogger(__name__)``); ``log_to_console`` (each stage's ``main``, and Ray actors) shows the
``dprec`` records as plain lines on the *current* stdout (below WARNING) and stderr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
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


# ---------------------------------------------------------------------------------------------- folders


def fsync_dir(folder: str | Path) -> None:
    """fsync a directory, so that renames inside it survive a crash (a no-op where the OS refuses)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_within(path: str | Path, folder: str | Path) -> bool:
    """True if ``path`` is ``folder`` or lies under it (both resolved, symlinks followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def atomic_write_folder(folder: str | Path, fill: Callable[[Path], object], replace: bool = False) -> Path:
    """Build a whole folder atomically: ``fill(tmp)`` writes into a hidden sibling, which is renamed onto ``folder``.

    The sibling is ``.tmp-<name>.<random>`` in ``folder``'s parent (created, with its parents, if missing).
    A reader of ``folder`` sees the old folder or the complete new one, never a mix: if ``fill`` fails
    (a full disk, an exception) the sibling is deleted and ``folder`` is untouched. An existing empty
    ``folder`` is replaced; a non-empty one only with ``replace`` (it is first renamed aside, the new folder
    renamed in, then the old one deleted; if the second rename fails the old one is put back), otherwise
    :class:`FileExistsError`. Returns ``folder``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{TMP_PREFIX}{folder.name}."))
    aside: Path | None = None
    try:
        os.chmod(tmp, 0o755)
        fill(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if folder.is_dir() and any(folder.iterdir()):
            if not replace:
                raise FileExistsError(17, "folder exists and is not empty", str(folder))
            aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{TMP_PREFIX}{folder.name}.old."))
            os.replace(folder, aside)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(aside, folder)
                aside = None
                raise
        else:
            os.replace(tmp, folder)  # onto a missing or empty folder
        fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
    return folder
