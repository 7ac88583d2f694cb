"""Atomic writes: every artifact is made under a temporary sibling name and then renamed into place.

A reader therefore sees either the previous target or the complete new one, never a half-written
file; a failed or interrupted write (``KeyboardInterrupt`` included) removes its temporary and leaves
an existing target as it was. Written files and folders get the permissions the user's umask asks
for, as if created directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_file_atomically(path: str | Path, fill: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Create the file ``path`` by calling ``fill(tmp)`` on a temporary sibling, then ``os.replace`` it.

    ``fill`` writes the whole file at ``tmp`` (its name does not end in ``path``'s suffix, so pass
    writers that infer a format from the extension an explicit format). Parent folders are created.
    ``FileExistsError`` if ``path`` exists and ``overwrite`` is false.
    """
    path = _claim(path, overwrite)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        fill(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to the file ``path`` with :func:`write_file_atomically`."""
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def write_dir_atomically(path: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create the folder ``path`` by calling ``fill(tmp)`` on a temporary sibling folder, then renaming it.

    With ``overwrite`` an existing ``path`` is deleted once ``fill`` has succeeded, just before the
    rename; otherwise it raises ``FileExistsError``. Parent folders are created.
    """
    path = _claim(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        _relax_permissions(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a ``Path`` if an artifact can be written there, checked before any long work.

    ``FileExistsError`` if it exists and not ``overwrite``, or if a file stands where one of
    its parent folders would be.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another --out or pass overwrite=True / --overwrite")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise FileExistsError(f"cannot create {path}: {blocking} is a file, not a folder; choose another --out")
    return path


def _claim(path: str | Path, overwrite: bool) -> Path:
    """``path`` checked by :func:`check_writable`, with its parent folders made."""
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _relax_permissions(folder: Path) -> None:
    """Give a temporary folder (``mkdtemp`` makes it 0700) and its contents the umask's permissions."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for file in folder.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)
