"""Ctrl-C in the command line: one line and nothing written, from the first instant of the process.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, and some libraries swallow it
while they import (a bare ``except`` around an optional import), after which the command would run on as if
nothing had happened. :func:`catch_interrupts` therefore also remembers every interrupt, the command line ends
with status 130 whenever one arrived, and :func:`check_not_interrupted` lets the atomic writers refuse to
put an output in place after one.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

MESSAGE = "interrupted; nothing was written"
"""What the command line says after an interrupt (as ``error: ...``)."""
STATUS = 130
"""The exit status after an interrupt, as a shell reports a process ended by SIGINT."""
INTERRUPTED = threading.Event()
"""Set by the SIGINT handler of :func:`catch_interrupts`; stays set for the rest of the process."""


def catch_interrupts() -> None:
    """Remember every SIGINT in :data:`INTERRUPTED` and raise it as Python's default handler does; an ignored
    SIGINT (a job started in the background) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


def check_not_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if an interrupt arrived earlier, even one a library swallowed."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
