"""``python -m tacdiff`` and the ``tacdiff`` script: the command line of :mod:`tacdiff.cli`."""

from __future__ import annotations

import sys

from tacdiff.host_memory import keep_freed_memory
from tacdiff.interrupts import INTERRUPTED, MESSAGE, STATUS, catch_interrupts


def main() -> None:
    """Run the command line with Ctrl-C caught before the slow imports (typer, then torch and diffusers in the
    commands) start: an interrupt at any moment, even one a library swallowed, ends the process with
    ``error: interrupted; nothing was written`` and status 130 (:mod:`tacdiff.interrupts`). Every command runs
    with freed memory kept for reuse (:func:`tacdiff.host_memory.keep_freed_memory`)."""
    catch_interrupts()
    keep_freed_memory()
    try:
        from tacdiff.cli import app

        app(prog_name="tacdiff")  # ends by SystemExit; typer turns an interrupt into a silent status 130
    except KeyboardInterrupt:
        pass
    except SystemExit:
        if not INTERRUPTED.is_set():
            raise
    print(f"error: {MESSAGE}", file=sys.stderr)
    sys.exit(STATUS)


if __name__ == "__main__":
    main()
