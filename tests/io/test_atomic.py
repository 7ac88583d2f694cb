"""Atomic writes: content, refusal of an existing target, overwrite, clean failure, umask permissions."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tacdiff.io.atomic import write_dir_atomically, write_file_atomically, write_text_atomically


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


WRITERS = {
    "file": (write_file_atomically, fill_file, True),
    "dir": (write_dir_atomically, fill_dir, False),
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
    with pytest.raises(FileExistsError, match="already exists; choose another --out or pass overwrite=True"):
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
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    write_dir_atomically(target, fill_dir("new"), overwrite=True)
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
    out = write_dir_atomically(tmp_path / "out", fill_dir("x"))
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755
    assert mode(out / "a.txt") == 0o644 and mode(out / "sub" / "b.txt") == 0o644


def test_write_text_writes_utf8_and_follows_overwrite(tmp_path: Path) -> None:
    path = write_text_atomically(tmp_path / "t.md", "x̂ ‖ε‖²\n")
    assert path.read_bytes() == "x̂ ‖ε‖²\n".encode()
    with pytest.raises(FileExistsError):
        write_text_atomically(path, "other", overwrite=False)
    write_text_atomically(path, "other")
    assert path.read_text() == "other"
