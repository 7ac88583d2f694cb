"""``use_backend``: the auto probe times layers once per machine and shape, then reads its cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from torch import nn

from tacdiff.backends import select
from tacdiff.backends import use_backend


def test_auto_runs_int8_only_where_measured_faster_and_caches(w4a8: nn.Module, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    execution = use_backend(copy.deepcopy(w4a8), "auto", cache=tmp_path)
    probed = {k: v for k, v in execution.items() if v.startswith("int8") or "int8 measured" in v}
    assert probed and all(v.endswith("x faster)") or "x its speed" in v for v in probed.values())
    cached = json.loads((tmp_path / "backend-probe.json").read_text())
    assert cached and all(value > 0 for value in cached.values())

    def no_timing(*args: object) -> float:
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(select, "_seconds", no_timing)
    assert use_backend(copy.deepcopy(w4a8), "auto", cache=tmp_path) == execution


def test_auto_decision_follows_the_measured_speed(w4a8: nn.Module, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = iter(range(10_000))
    # fake layers (timed first) look slow, int8 twins fast, alternately
    monkeypatch.setattr(select, "_seconds", lambda layer, x: 2.0 if next(calls) % 2 == 0 else 1.0)
    execution = use_backend(copy.deepcopy(w4a8), "auto", cache=tmp_path / "a")
    assert any(v == "int8 (2.00x faster)" for v in execution.values())
    monkeypatch.setattr(select, "_seconds", lambda layer, x: 1.0 if next(calls) % 2 == 0 else 2.0)
    execution = use_backend(copy.deepcopy(w4a8), "auto", cache=tmp_path / "b")
    assert not any(v.startswith("int8") for v in execution.values())
    assert any(v == "fake: int8 measured 0.50x its speed" for v in execution.values())


def test_an_unreadable_cache_is_measured_again(w4a8: nn.Module, tmp_path: Path) -> None:
    (tmp_path / "backend-probe.json").write_text("not json")
    use_backend(copy.deepcopy(w4a8), "auto", cache=tmp_path)
    assert json.loads((tmp_path / "backend-probe.json").read_text())


def test_auto_without_example_inputs_keeps_layers_fake_with_the_reason(tmp_path: Path) -> None:
    """A Kandinsky-2.2-style UNet (image embeddings as ``added_cond_kwargs``) has no example inputs to probe with."""
    import torch
    from tiny_models import TEXT_DIM, calibration_of, quantized_copy, tiny_cond, tiny_model

    kandinsky = tiny_model("cond_unet", addition_embed_type="image", encoder_hid_dim=TEXT_DIM)
    cond = {**tiny_cond("cond_unet", 2, 0), "added_cond_kwargs": {"image_embeds": torch.randn(2, TEXT_DIM)}}
    model = quantized_copy(kandinsky, calibration_of(kandinsky, 0, num_samples=2, cond=cond), weight_bits=4, act_bits=8)
    execution = use_backend(model, "auto", cache=tmp_path)
    assert not any(v.startswith("int8") for v in execution.values())
    assert any("auto could not probe (no example inputs for a UNet with 'image'" in v for v in execution.values())


def test_integer_execution_on_the_cpu_keeps_freed_memory(w4a8: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(select, "freed_memory_kept", lambda: False)
    monkeypatch.setattr(select, "keep_freed_memory", lambda: calls.append("kept") or True)
    use_backend(copy.deepcopy(w4a8), "fake")
    assert not calls
    use_backend(copy.deepcopy(w4a8), "int8")
    assert calls == ["kept"]
