"""Fault catalogue 1: ``--overwrite`` replaces only tacdiff's own output, refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from fault_support import QUIET_CALIBRATION, World, assert_one_error, cli, snapshot
from tacdiff.io import read_metadata


def user_folder(root: Path) -> Path:
    folder = root / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def link_to_artifact(root: Path, world: World) -> Path:
    (root / "link").symlink_to(world.copy("w8a8", root))
    return root / "link"


def plain_file(root: Path) -> Path:
    (root / "notes.txt").write_text("not an artifact")
    return root / "notes.txt"


# name -> (make the --out path inside the test's folder, a fragment of the error)
QUANTIZE_TARGETS = {
    "a folder of other files": (lambda root, world: user_folder(root), "it is not a quantized artifact written by"),
    "the model folder": (lambda root, world: root / "fp", "is the input"),
    "a parent of the model folder": (lambda root, world: root, "is the input"),
    "the current folder": (lambda root, world: Path("."), "current folder or one of its parents"),
    "a symbolic link to an artifact": (link_to_artifact, "is a symbolic link"),
    "a plain file": (lambda root, world: plain_file(root), "is a file, but the quantized artifact is a folder"),
    "a file where a parent folder should be": (lambda root, world: plain_file(root) / "out", "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(QUANTIZE_TARGETS))
def test_quantize_overwrite_refuses_what_tacdiff_did_not_write(world: World, tmp_path: Path, case: str) -> None:
    model = world.copy("fp", tmp_path)
    make, fragment = QUANTIZE_TARGETS[case]
    out = make(tmp_path, world)
    before = snapshot(tmp_path)
    cwd = tmp_path if case == "the current folder" else None
    code, output = cli("quantize", model, "--out", out, "--overwrite", *QUIET_CALIBRATION, cwd=cwd)
    assert_one_error(code, output, fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["a plain file", "an artifact folder", "another tables file's link"])
def test_calibrate_overwrite_refuses_what_is_not_a_tables_file(world: World, tmp_path: Path, case: str) -> None:
    artifact, fp = world.copy("w4a8", tmp_path), world.copy("fp", tmp_path)
    if case == "a plain file":
        out, fragment = plain_file(tmp_path), "not a correction tables file written by"
    elif case == "an artifact folder":
        out, fragment = world.copy("w8a8", tmp_path), "is a folder, but the correction tables file is a file"
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "tac.safetensors").symlink_to(world.copy("tac.safetensors", tmp_path / "real"))
        out, fragment = tmp_path / "tac.safetensors", "is a symbolic link"
    before = snapshot(tmp_path)
    code, output = cli("calibrate", artifact, "--fp-model", fp, "--out", out, "--overwrite", "--steps", "2",
                       "--samples", "2", "--quiet")
    assert_one_error(code, output, fragment)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_an_earlier_artifact_and_nothing_beside_it(world: World, tmp_path: Path) -> None:
    model, out = world.copy("fp", tmp_path), world.copy("w8a8", tmp_path)
    (tmp_path / "keep.txt").write_text("untouched")
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("w8a8")}
    code, output = cli("quantize", model, "--out", out, "--w-bits", "4", "--overwrite", *QUIET_CALIBRATION)
    assert code == 0, output
    assert read_metadata(out)["quant_config"].count('"weight_bits": 4') == 1
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("w8a8")}
    assert after == before


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_a_path_through_a_missing_folder_is_judged_where_it_lands(world: World, tmp_path: Path,
                                                                  command: str) -> None:
    victim = user_folder(tmp_path) if command == "quantize" else plain_file(tmp_path)
    sneaky = tmp_path / "missing" / ".." / victim.name
    before = snapshot(tmp_path)
    if command == "quantize":
        code, output = cli("quantize", world.root / "fp", "--out", sneaky, *QUIET_CALIBRATION)
    else:
        code, output = cli("calibrate", world.root / "w4a8", "--fp-model", world.root / "fp", "--out", sneaky,
                           "--steps", "2", "--samples", "2", "--quiet")
    assert_one_error(code, output, str(victim), "already exists")
    assert snapshot(tmp_path) == before


def test_a_report_path_never_replaces_tacdiff_files(world: World, tmp_path: Path) -> None:
    tables = world.copy("tac.safetensors", tmp_path)
    before = snapshot(tmp_path)
    code, output = cli("eval", world.root / "w4a8", "--steps", "2", "--samples", "2", "--quiet", "--json", tables)
    assert_one_error(code, output, "refusing to replace", "tac.safetensors")
    assert snapshot(tmp_path) == before
