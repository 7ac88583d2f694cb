"""The int8 backend against the fake-quant model it converts: same codes, same answers within float rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tacdiff.backends import use_backend
from tacdiff.backends.int8 import Int8Conv2d, Int8Linear
from tacdiff.quant.apply import format_summary
from tacdiff.quant.layers import QuantWeightMixin
from tiny_models import outputs, sqnr_db

# A quantized network amplifies last-bit float differences: one flipped activation code changes the next
# layer's inputs by a whole step. So the fake-quant model run one sample at a time already differs from
# itself run batched by ~34 dB at the output. The int8 model must agree with fake at least that well
# (less this margin), match fake's accuracy against FP within 0.3 dB, and agree per layer (same input).
MARGIN_DB, ACCURACY_DB, LAYER_DB = 3.0, 0.3, 60.0


def _int8_copy(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    twin = copy.deepcopy(model)
    return twin, use_backend(twin, "int8")


@torch.no_grad()
def _one_at_a_time(model: nn.Module, data) -> torch.Tensor:
    return torch.cat([model(data.x[i:i + 1], data.timesteps[i:i + 1], **data.cond_of(torch.tensor([i]))).sample
                      for i in range(len(data.x))])


@pytest.mark.parametrize("fixture", ["w8a8", "w4a8", "w8a8_grouped", "w8a8_dynamic", "cond_w8a8",
                                     "cond_w8a8_dynamic_gptq"])
def test_int8_model_agrees_with_fake_quant(fixture: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    cond = fixture.startswith("cond")
    data = request.getfixturevalue("cond_held_out" if cond else "held_out")
    fp = outputs(request.getfixturevalue("cond_unet" if cond else "unet"), data)
    twin, execution = _int8_copy(model)
    assert any(isinstance(m, (Int8Conv2d, Int8Linear)) for m in twin.modules())
    assert not any(isinstance(m, QuantWeightMixin) and m.act_quant is not None for m in twin.modules()), execution
    fake, int8 = outputs(model, data), outputs(twin, data)
    assert sqnr_db(fake, int8) >= sqnr_db(fake, _one_at_a_time(model, data)) - MARGIN_DB
    assert abs(sqnr_db(fp, fake) - sqnr_db(fp, int8)) <= ACCURACY_DB


def test_every_converted_layer_agrees_with_its_fake_twin(w8a8: nn.Module, held_out) -> None:
    twin, _ = _int8_copy(w8a8)
    fake_layers = dict(w8a8.named_modules())
    seen = []

    def compare(name: str):
        def hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen.append((name, sqnr_db(fake_layers[name](args[0]), out)))
        return hook

    for name, module in twin.named_modules():
        if isinstance(module, (Int8Conv2d, Int8Linear)):
            module.register_forward_hook(compare(name))
    index = torch.arange(4)
    with torch.no_grad():
        twin(held_out.x[index], held_out.timesteps[index])
    assert seen and min(db for _, db in seen) >= LAYER_DB, seen


def test_layers_the_int8_path_cannot_run_stay_fake_with_a_reason(w8a8_blocked: nn.Module, w8a8: nn.Module) -> None:
    _, execution = _int8_copy(w8a8_blocked)
    assert "fake: block-scaled activations need a block-scaled GEMM" in execution.values()
    assert not any(where.startswith("int8") for where in execution.values())
    twin, execution = _int8_copy(w8a8)
    weight_only = [name for name, where in execution.items() if "weight-only" in where]
    assert weight_only == ["conv_in"]  # its input is the model input, left unquantized by default
    assert any(where.startswith("fake: attention") for where in execution.values())
    summary = format_summary(twin)
    assert "runs" in summary.splitlines()[0] and "int8" in summary


def test_int8_model_keeps_no_float_weights(w4a8: nn.Module) -> None:
    twin, _ = _int8_copy(w4a8)
    float_bytes = sum(p.numel() * p.element_size() for p in w4a8.parameters())
    int_bytes = sum(t.numel() * t.element_size() for t in [*twin.parameters(), *twin.buffers()])
    assert int_bytes < 0.45 * float_bytes


def test_unknown_backend_is_refused(w8a8: nn.Module) -> None:
    with pytest.raises(ValueError, match="choose one of fake, int8, auto"):
        use_backend(copy.deepcopy(w8a8), "int4")
