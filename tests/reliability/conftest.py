"""The fault catalogue's world: a saved tiny FP UNet, W4A8 and W8A8 artifacts and W4A8 TAC tables,
all made once through the command line; tests copy what they use into their own folder."""

from __future__ import annotations

import pytest

from fault_support import QUIET_CALIBRATION, World, cli
from tiny_models import tiny_model


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    tiny_model("unet").save_pretrained(root / "fp")
    for bits in ("4", "8"):
        code, output = cli("quantize", root / "fp", "--out", root / f"w{bits}a8", "--w-bits", bits,
                           *QUIET_CALIBRATION)
        assert code == 0, output
    code, output = cli("calibrate", root / "w4a8", "--fp-model", root / "fp", "--out", root / "tac.safetensors",
                       "--steps", "2", "--samples", "2", "--batch-size", "2", "--quiet")
    assert code == 0, output
    return World(root)
