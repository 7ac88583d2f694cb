"""File-system faults for tests: a small tmpfs mounted read-only or nearly full (needs root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs at ``path`` mounted with ``options`` (e.g. ``ro`` or ``size=64k``); skipped without root,
    failed when root cannot mount (on CI the suite runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"root could not mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
