"""Helpers of the fault catalogue: run the CLI, snapshot a folder tree, check the one-line error."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from tacdiff.cli import app

QUIET_CALIBRATION = ("--calib-samples", "2", "--calib-steps", "2", "--calib-kept-steps", "2", "--quiet")
EVAL_FAST = ("--steps", "2", "--samples", "2", "--batch-size", "2", "--quiet")


@dataclass(frozen=True)
class World:
    """Read-only originals: ``fp`` (UNet folder), ``w4a8``/``w8a8`` (artifacts), ``tac`` (tables for w4a8)."""

    root: Path

    def copy(self, name: str, into: Path) -> Path:
        """A private copy of ``name`` in ``into`` (links are copied as links)."""
        source, target = self.root / name, into / name
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
        return target


def cli(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``tacdiff ARGS`` in-process; the exit code and everything it printed (stdout and stderr)."""
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        os.chdir(previous)
    return result.exit_code, result.output


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below ``root``: folders, link targets and file content hashes."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            entries[key] = "folder"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def assert_one_error(code: int, output: str, *fragments: str) -> str:
    """Exit status 2 and exactly one ``error: ...`` line holding every fragment; no traceback."""
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
