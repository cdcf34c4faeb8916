"""Small C kernels, compiled on first use with the machine's C compiler and loaded with ``ctypes``.

A kernel is one self-contained C file beside this module (no Python or torch headers, so it builds in a fraction
of a second). :func:`load` compiles it once per source, compiler and flags into the kernel cache
(``$DPREC_KERNEL_CACHE``, default ``~/.cache/dprec/kernels``; written to a temporary name and renamed, so processes
building at the same time never load a half-written library) and returns the library, or ``None`` with one log
line where there is no compiler or the build fails: every caller keeps a torch path for that case.
``DPREC_NATIVE=0`` turns the kernels off. ``ctypes`` releases the GIL during a call, so threads run kernels side
by side.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
_loaded: dict[str, ctypes.CDLL | None] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("DPREC_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dprec" / "kernels"


def enabled() -> bool:
    return os.environ.get("DPREC_NATIVE", "1") != "0"


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of ``<name>.c`` (built on first use), or ``None`` if it cannot be built or
    ``DPREC_NATIVE=0``. The outcome is remembered for the process."""
    if not enabled():
        return None
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = ctypes.CDLL(str(build(name)))
            except (OSError, subprocess.SubprocessError) as err:
                log.warning("C kernel %s unavailable (%s); using the torch implementation", name, err)
                _loaded[name] = None
        return _loaded[name]


def build(name: str) -> Path:
    """Compile ``<name>.c`` into the kernel cache unless the same source, compiler and flags are there; its path."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    executable = shutil.which(compiler)
    if executable is None:
        raise FileNotFoundError(f"no C compiler {compiler!r} on PATH")
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), executable.encode(), " ".join(FLAGS).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([executable, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise subprocess.SubprocessError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
