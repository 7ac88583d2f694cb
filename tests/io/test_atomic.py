"""Atomic writes: content, refusal of an existing target, overwrite of tacdiff's own output only, clean
failure, a swap that survives a kill at every stage, umask permissions."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

import tacdiff.io.atomic as atomic
from fs_support import tmpfs
from tacdiff.interrupts import INTERRUPTED
from tacdiff.io.atomic import check_writable, write_dir_atomically, write_file_atomically, write_text_atomically


def fill_file(text: str) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_text(text)


def fill_dir(text: str) -> Callable[[Path], None]:
    def fill(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text(text)
        (tmp / "sub" / "b.txt").write_text(text)
    return fill


def contents(path: Path) -> dict[str, str]:
    """``{relative path: text}`` of a file or every file below a folder."""
    if path.is_file():
        return {".": path.read_text()}
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def ours(path: Path) -> bool:
    """Recognises the test folders as their writer's own output."""
    return (path / "a.txt").is_file()


def write_dir(path: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    return write_dir_atomically(path, fill, overwrite, recognise=ours, what="test folder")


WRITERS = {
    "file": (write_file_atomically, fill_file, True),
    "dir": (write_dir, fill_dir, False),
}


@pytest.fixture(params=list(WRITERS))
def writer(request: pytest.FixtureRequest) -> tuple[Callable[..., Path], Callable[[str], Callable[[Path], None]], bool]:
    return WRITERS[request.param]


def test_writes_content_and_creates_parent_folders(writer, tmp_path: Path) -> None:
    write, fill, _ = writer
    target = tmp_path / "a" / "b" / "out.bin"
    assert write(target, fill("new")) == target
    assert set(contents(target).values()) == {"new"}
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["out.bin"]


def test_accepts_a_string_path(writer, tmp_path: Path) -> None:
    write, fill, _ = writer
    assert write(str(tmp_path / "out"), fill("new")) == tmp_path / "out"


def test_default_overwrite(writer, tmp_path: Path) -> None:
    write, fill, default = writer
    target = tmp_path / "out"
    write(target, fill("old"))
    if default:
        write(target, fill("new"))
        assert set(contents(target).values()) == {"new"}
    else:
        with pytest.raises(FileExistsError):
            write(target, fill("new"))


def test_an_existing_target_is_refused_and_left_untouched(writer, tmp_path: Path) -> None:
    write, fill, _ = writer
    target = tmp_path / "out"
    write(target, fill("old"), overwrite=True)
    before = contents(target)
    with pytest.raises(FileExistsError, match="already exists; choose another output path, or allow replacing it"):
        write(target, fill("new"), overwrite=False)
    assert contents(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_the_target(writer, tmp_path: Path) -> None:
    write, fill, _ = writer
    target = tmp_path / "out"
    write(target, fill("old"), overwrite=True)
    write(target, fill("new"), overwrite=True)
    assert set(contents(target).values()) == {"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_overwrite_drops_files_the_new_folder_lacks(tmp_path: Path) -> None:
    target = write_dir(tmp_path / "out", fill_dir("old"))
    (target / "stale.txt").write_text("stale")
    write_dir(target, fill_dir("new"), overwrite=True)
    assert sorted(contents(target)) == ["a.txt", "sub/b.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_fill_leaves_no_temporary_and_keeps_the_old_target(writer, tmp_path: Path,
                                                                     error: BaseException, existing: bool) -> None:
    write, fill, _ = writer
    target = tmp_path / "out"
    if existing:
        write(target, fill("old"), overwrite=True)
    before = contents(target) if existing else None

    def failing(tmp: Path) -> None:
        fill("half")(tmp)
        raise error

    with pytest.raises(type(error)):
        write(target, failing, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    if existing:
        assert contents(target) == before


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
def test_a_file_gets_the_umask_permissions_not_0600(tmp_path: Path) -> None:
    assert mode(write_file_atomically(tmp_path / "out", fill_file("x"))) == 0o644
    assert mode(write_text_atomically(tmp_path / "text", "x")) == 0o644
    os.umask(0o027)
    assert mode(write_file_atomically(tmp_path / "out", fill_file("x"))) == 0o640


@pytest.mark.usefixtures("umask_022")
def test_a_folder_and_its_contents_get_the_umask_permissions(tmp_path: Path) -> None:
    out = write_dir(tmp_path / "out", fill_dir("x"))
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755
    assert mode(out / "a.txt") == 0o644 and mode(out / "sub" / "b.txt") == 0o644


def test_write_text_writes_utf8_and_follows_overwrite(tmp_path: Path) -> None:
    path = write_text_atomically(tmp_path / "t.md", "x̂ ‖ε‖²\n")
    assert path.read_bytes() == "x̂ ‖ε‖²\n".encode()
    with pytest.raises(FileExistsError):
        write_text_atomically(path, "other", overwrite=False)
    write_text_atomically(path, "other")
    assert path.read_text() == "other"


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (links included, by target) with its content."""
    return {str(p.relative_to(root)): (f"-> {os.readlink(p)}" if p.is_symlink() else p.read_text())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def test_overwrite_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"refusing to replace .*mine: it is not a test folder written by"):
        write_dir(target, fill_dir("new"), overwrite=True)
    assert snapshot(tmp_path) == before


def test_overwrite_without_a_recogniser_refuses_everything(tmp_path: Path) -> None:
    target = write_dir(tmp_path / "out", fill_dir("old"))
    with pytest.raises(FileExistsError, match="refusing to replace"):
        write_dir_atomically(target, fill_dir("new"), overwrite=True)
    assert set(contents(target).values()) == {"old"}


@pytest.mark.parametrize("found", ["file", "folder"])
def test_a_file_where_a_folder_is_expected_and_the_reverse_are_refused(tmp_path: Path, found: str) -> None:
    target = tmp_path / "out"
    if found == "file":
        target.write_text("a.txt")
        with pytest.raises(FileExistsError, match="is a file, but the test folder is a folder"):
            write_dir(target, fill_dir("new"), overwrite=True)
    else:
        write_dir(target, fill_dir("old"))
        with pytest.raises(FileExistsError, match="is a folder, but the file is a file"):
            write_file_atomically(target, fill_file("new"))
    assert target.exists()


def test_links_are_never_written_through(tmp_path: Path) -> None:
    real = write_dir(tmp_path / "real", fill_dir("old"))
    (tmp_path / "real.txt").write_text("old")
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="is a symbolic link"):
        write_dir(tmp_path / "link", fill_dir("new"), overwrite=True)
    with pytest.raises(ValueError, match="is a symbolic link"):
        write_text_atomically(tmp_path / "link.txt", "new")
    assert snapshot(tmp_path) == before


def test_the_current_folder_and_its_parents_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    write_dir(work, fill_dir("old"))
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for target in (".", "..", str(work), "/"):
        with pytest.raises(ValueError, match="current folder or one of its parents"):
            write_dir(target, fill_dir("new"), overwrite=True)
    assert snapshot(tmp_path) == before


def test_an_input_and_its_parents_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "models" / "unet"
    write_dir(model, fill_dir("weights"))
    before = snapshot(tmp_path)
    for target in (model, model.parent, tmp_path / "models" / ".." / "models" / "unet"):
        with pytest.raises(ValueError, match="is the input .* or a folder holding it"):
            check_writable(target, overwrite=True, recognise=ours, folder=True, inputs=[model])
    assert snapshot(tmp_path) == before
    assert check_writable(model / "quantized", inputs=[model]) == model / "quantized"  # inside it is fine


def test_a_read_only_location_is_reported_before_any_work(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64k"):
        with pytest.raises(PermissionError, match="cannot write in .*ro .*Read-only file system"):
            check_writable(tmp_path / "ro" / "out", folder=True)


def test_too_little_free_space_is_reported_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not enough free space in .*: the output needs about"):
        check_writable(tmp_path / "out", need_bytes=2**62)


def _killed_at(stage: str, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a forked child: replace ``target`` and SIGKILL the process at ``stage``."""
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    real_swap, real_rmtree = atomic._swap, atomic.shutil.rmtree

    def fill(tmp: Path) -> None:
        fill_dir("new")(tmp)
        if stage == "fill":
            (tmp / "a.txt").write_text("half")
            kill()

    def swap(new: Path, old: Path) -> None:
        if stage == "before swap":
            kill()
        real_swap(new, old)
        if stage == "after swap":
            kill()

    def rmtree(path: Path, *args: object, **kwargs: object) -> None:
        if stage == "removing the old folder":
            (Path(path) / "a.txt").unlink()
            kill()
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic, "_swap", swap)
    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    write_dir(target, fill, overwrite=True)


@pytest.mark.parametrize("stage, survivor", [("fill", "old"), ("before swap", "old"), ("after swap", "new"),
                                             ("removing the old folder", "new")])
def test_a_replacement_killed_at_any_stage_leaves_a_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    stage: str, survivor: str) -> None:
    target = write_dir(tmp_path / "out", fill_dir("old"))
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            _killed_at(stage, target, monkeypatch)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert contents(target) == {"a.txt": survivor, "sub/b.txt": survivor}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert all(atomic.TEMP_MARK in name for name in leftovers)


def test_the_two_rename_fallback_replaces_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = write_dir(tmp_path / "out", fill_dir("old"))
    write_dir(target, fill_dir("new"), overwrite=True)
    assert set(contents(target).values()) == {"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture
def swallowed_interrupt() -> Iterator[None]:
    """A Ctrl-C that arrived earlier and that a library swallowed: only the remembered flag is left."""
    INTERRUPTED.set()
    try:
        yield
    finally:
        INTERRUPTED.clear()


@pytest.mark.parametrize("existing", [False, True])
def test_nothing_is_put_in_place_after_a_swallowed_interrupt(writer, tmp_path: Path, existing: bool,
                                                             swallowed_interrupt: None) -> None:
    write, fill, _ = writer
    target = tmp_path / "out"
    if existing:
        INTERRUPTED.clear()
        write(target, fill("old"), overwrite=True)
        INTERRUPTED.set()
    with pytest.raises(KeyboardInterrupt):
        write(target, fill("new"), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    if existing:
        assert set(contents(target).values()) == {"old"}
