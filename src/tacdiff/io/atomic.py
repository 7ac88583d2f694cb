"""Atomic writes that never touch what tacdiff did not write.

Every output is made under a temporary sibling name and then renamed into place, so a reader
sees either the previous target or the complete new one, never a half-written file; a failed
or interrupted write (``KeyboardInterrupt`` included) removes its temporary and leaves an
existing target as it was. A folder that replaces an existing one is swapped in with one
atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), so even a process killed at any point
leaves the old or the new complete folder under the final name (at worst a hidden
``.NAME.tacdiff-*`` temporary beside it).

Replacing is allowed only where the caller recognises the existing target as its own earlier
output (``recognise``); symbolic links, the current folder and its parents, and the inputs of
the run and their parents are never replaced. Written files and folders get the permissions
the user's umask asks for, as if created directly. In a process group (``torchrun``) only rank 0
writes; the others wait for it (:func:`tacdiff.distributed.main_process_writes`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from tacdiff.distributed import main_process_writes
from tacdiff.interrupts import check_not_interrupted

Recognise = Callable[[Path], bool]
"""Whether an existing path holds output that tacdiff wrote and may replace."""

TEMP_MARK = ".tacdiff-"
MiB = 2**20


def is_regular_file(path: Path) -> bool:
    """A plain file, not a link."""
    return path.is_file() and not path.is_symlink()


def report_file(*suffixes: str) -> Recognise:
    """The :data:`Recognise` for report files (JSON, markdown, images): a plain file with one of ``suffixes``,
    so that e.g. ``--json tables.safetensors`` never replaces the tables."""
    return lambda path: is_regular_file(path) and path.suffix.lower() in suffixes


@main_process_writes
def write_file_atomically(path: str | Path, fill: Callable[[Path], None], overwrite: bool = True, *,
                          recognise: Recognise | None = None, what: str = "file",
                          inputs: Sequence[str | Path] = ()) -> Path:
    """Create the file ``path`` by calling ``fill(tmp)`` on a temporary sibling, then ``os.replace`` it.

    ``fill`` writes the whole file at ``tmp`` (its name does not end in ``path``'s suffix, so pass
    writers that infer a format from the extension an explicit format). Parent folders are created.
    An existing ``path`` is replaced only with ``overwrite`` and when ``recognise(path)`` (default:
    a plain file with ``path``'s suffix; see :func:`check_writable` for the errors).
    """
    recognise = recognise or report_file(Path(path).suffix.lower())
    path = _claim(path, overwrite, recognise, what, inputs, folder=False)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        fill(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp creates 0600
        if path.exists():
            _check_replaceable(path, overwrite, recognise, what, folder=False)  # appeared while filling?
        check_not_interrupted()  # a library may have swallowed a Ctrl-C: still write nothing
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        raise _named(error, path) from None
    return path


def write_text_atomically(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to the file ``path`` with :func:`write_file_atomically`."""
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


@main_process_writes
def write_dir_atomically(path: str | Path, fill: Callable[[Path], None], overwrite: bool = False, *,
                         recognise: Recognise | None = None, what: str = "folder",
                         inputs: Sequence[str | Path] = ()) -> Path:
    """Create the folder ``path`` by calling ``fill(tmp)`` on a temporary sibling folder, then renaming it.

    With ``overwrite`` an existing ``path`` that ``recognise`` accepts is swapped with the new
    folder in one atomic exchange once ``fill`` has succeeded, then deleted; any other existing
    ``path`` raises (see :func:`check_writable`). Parent folders are created.
    """
    path = _claim(path, overwrite, recognise, what, inputs, folder=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent))
    try:
        fill(tmp)
        _relax_permissions(tmp)
        check_not_interrupted()
        if path.exists():
            _check_replaceable(path, overwrite, recognise, what, folder=True)  # appeared while filling?
            _swap(tmp, path)  # tmp now holds the old folder
            shutil.rmtree(tmp)
        else:
            tmp.rename(path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _named(error, path) from None
    return path


def _named(error: BaseException, path: Path) -> BaseException:
    """``error``, or for a full disk an ``OSError`` naming the output that did not fit."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left" in str(error):
        return OSError(errno.ENOSPC, f"no space left on the device while writing {path}; nothing was written. "
                                     "Free some space or choose another output location")
    return error


def check_writable(path: str | Path, overwrite: bool = False, *, recognise: Recognise | None = None,
                   what: str = "output", inputs: Sequence[str | Path] = (), folder: bool = False,
                   need_bytes: int = 0) -> Path:
    """``path`` as a ``Path`` if tacdiff may write its ``what`` there; checked before any long work.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is false, or when it exists
    and is not output that ``recognise`` accepts (a folder of other files, a file where a folder
    is expected or the reverse); ``ValueError`` for a symbolic link, the current folder or one of
    its parents, one of ``inputs``, one of their parents or an existing path inside one of them;
    ``FileExistsError`` for a file standing where a parent folder would be; ``PermissionError``
    when the location is not writable; ``OSError`` (``ENOSPC``) when it has less than
    ``need_bytes`` free.
    """
    path = Path(os.path.abspath(path))  # "missing/../x" is x: judged by the path that will be written
    _check_not_protected(path, inputs)
    if path.exists() or path.is_symlink():
        _check_replaceable(path, overwrite, recognise, what, folder)
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise FileExistsError(f"cannot create {path}: {blocking} is a file, not a folder; choose another --out")
    _check_room(_nearest_folder(path), need_bytes)
    return path


def _check_not_protected(path: Path, inputs: Sequence[str | Path]) -> None:
    """Refuse links, the current folder and its parents, and the inputs and their parents."""
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; tacdiff does not write through or replace links. "
                         "Name a path that is not a link")
    target = path.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise ValueError(f"{path} is the current folder or one of its parents; choose a new folder for the output")
    for source in inputs:
        source = Path(source).resolve()
        if target == source or target in source.parents:
            raise ValueError(f"{path} is the input {source} or a folder holding it; writing there would replace "
                             "the input. Choose another output path")
        if path.exists() and source in target.parents:
            raise ValueError(f"{path} is part of the input {source}; tacdiff never replaces anything inside "
                             "its inputs. Choose another output path")


def _check_replaceable(path: Path, overwrite: bool, recognise: Recognise | None, what: str, folder: bool) -> None:
    """Raise unless ``path`` may be replaced: ``overwrite`` is on and it holds tacdiff's own ``what``."""
    if not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output path, or allow replacing it "
                              "(--overwrite, overwrite=True)")
    if path.is_dir() != folder:
        expected, found = ("folder", "file") if folder else ("file", "folder")
        raise FileExistsError(f"{path} is a {found}, but the {what} is a {expected}; choose another path")
    if recognise is None or not recognise(path):
        raise FileExistsError(f"refusing to replace {path}: it is not a {what} written by tacdiff (tacdiff "
                              "replaces only its own output). Choose another path or remove it yourself")


def _nearest_folder(path: Path) -> Path:
    """The closest existing folder at or above ``path``'s parent."""
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    return folder


def _check_room(folder: Path, need_bytes: int) -> None:
    """Raise unless a file can be created in ``folder`` and it has ``need_bytes`` free."""
    if not folder.is_dir():
        return  # a file where a parent folder should be: reported by the caller
    try:
        handle, probe = tempfile.mkstemp(prefix=f".probe{TEMP_MARK}", dir=folder)
    except OSError as error:
        raise PermissionError(f"cannot write in {folder} ({error.strerror}); choose a writable output location") \
            from None
    os.close(handle)
    os.unlink(probe)
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"not enough free space in {folder}: the output needs about "
                                    f"{need_bytes / MiB:.1f} MiB and {free / MiB:.1f} MiB are free; "
                                    "free some space or choose another output location")


def _claim(path: str | Path, overwrite: bool, recognise: Recognise | None, what: str,
           inputs: Sequence[str | Path], folder: bool) -> Path:
    """``path`` checked by :func:`check_writable`, with its parent folders made."""
    path = check_writable(path, overwrite, recognise=recognise, what=what, inputs=inputs, folder=folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _swap(new: Path, old: Path) -> None:
    """Exchange two folders: ``old`` gets ``new``'s content and ``new`` the old one.

    One atomic ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere (or on a file system without
    it) two renames, with a short moment in which ``old`` does not exist.
    """
    if _exchange(new, old):
        return
    parked = Path(tempfile.mkdtemp(prefix=f".{old.name}{TEMP_MARK}old-", dir=old.parent))
    parked.rmdir()
    old.rename(parked)
    new.rename(old)
    parked.rename(new)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2``; False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


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
