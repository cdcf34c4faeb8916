"""SIGTERM, SIGINT and SIGHUP as an exception, so that a stopped run still closes what it opened.

A CLI wraps its work in :func:`stop_on_signals`: inside it, SIGTERM, SIGINT and SIGHUP raise
:class:`Interrupted` in the main thread, and the ``except``/``finally`` paths run (the MLflow
run ends as ``KILLED`` instead of staying ``RUNNING``). Code that must not be cut in half
(closing the MLflow run, registering a model) runs under :func:`deferred_signals`: a signal that
arrives there is held and raised when the block ends. Outside :func:`stop_on_signals` both are
no-ops, so library callers keep Python's default behaviour.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))
"""Signals that stop a run: SIGTERM (kill, schedulers), SIGINT (Ctrl-C), SIGHUP (the terminal closed)."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM or SIGINT); ``signum`` says by which signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, what a shell reports for a process that a signal ended."""
        return 128 + self.signum


class _State:
    installed = 0
    """Depth of active :func:`stop_on_signals` blocks."""
    deferring = 0
    """Depth of active :func:`deferred_signals` blocks."""
    held: int | None = None
    """A signal that arrived inside a deferred block and waits to be raised."""
    raised = False
    """An :class:`Interrupted` is already on its way: later signals are ignored."""


def _handler(signum: int, frame: object) -> None:
    if _State.raised:
        return
    if _State.deferring:
        if _State.held is None:
            _State.held = signum
        return
    _State.raised = True
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside: SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` (main thread only; elsewhere a no-op).

    Only the first signal raises; later ones are ignored until the block ends, so the cleanup
    that the first one started is not cut short. A signal the process ignores (``nohup`` ignores
    SIGHUP) stays ignored. The previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}
    for s in previous:
        signal.signal(s, _handler)
    _State.installed += 1
    try:
        yield
    finally:
        _State.installed -= 1
        for s, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, handler)
        if not _State.installed:
            _State.held, _State.raised = None, False


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGTERM / SIGINT / SIGHUP while the block runs; a held one is raised as :class:`Interrupted` when it ends.

    When the block ends with an exception, that exception goes on and the signal stays held: the
    next deferred block that ends cleanly outside an ``except`` clause raises it; otherwise it is
    dropped when :func:`stop_on_signals` ends (the process is stopping anyway).
    """
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    # reached only when the block ended without an exception; inside an ``except`` clause the
    # exception being handled goes on, and the held signal is dropped with it
    if not _State.deferring and _State.held is not None and not _State.raised and sys.exc_info()[0] is None:
        signum, _State.held, _State.raised = _State.held, None, True
        raise Interrupted(signum)
