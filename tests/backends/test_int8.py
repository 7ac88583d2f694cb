"""The int8 backend against the fake-quant model it converts: same codes, same answers within float rounding."""

from __future__ import annotations

import copy
import logging
import statistics

import pytest
import torch
from torch import nn

from tacdiff.backends import int8 as int8_backend
from tacdiff.backends import use_backend
from tacdiff.backends.int8 import (NO_VNNI, Int8AttentionValues, Int8Conv2d, Int8Embedding, Int8Linear,
                                   adds_weight_zero_point, values_kernel_reason)
from tacdiff.backends.int_mm import Int8Matmul
from tacdiff.backends.select import ATTENTION_INT8
from tacdiff.io.artifact import save_quantized
from tacdiff.quant import attention
from tacdiff.quant.apply import format_summary, quant_state
from tacdiff.quant.attention import quantized_attention
from tacdiff.quant.layers import QuantConv2d, QuantEmbedding, QuantWeightMixin
from tacdiff.speed import weight_bytes
from int8_support import needs_exact_int8, pretend_no_vnni
from tiny_models import (attention_with_ranges, calibration_of, outputs, quantized_copy, sqnr_db, tiny_cond,
                         tiny_model)

# A quantized network amplifies last-bit float differences: one flipped activation code changes the next
# layer's inputs by a whole step. The int8 layers differ from their fake twins by about 5e-7 relative (~126 dB on
# the tiny UNet: float epilogues in another order), so the reference is the fake model itself with every quantized
# layer's input moved by that much (and run one sample at a time): the median of such draws, since one draw alone
# varies (model inputs moved by a millionth gave 25-42 dB at W8A4) and differs between CPUs. The int8 model must
# agree with fake at least that well (less this margin), match fake's accuracy against FP within 0.3 dB, and agree
# per layer.
MARGIN_DB, ACCURACY_DB, LAYER_DB = 3.0, 0.3, 60.0
PERTURBED_DRAWS, PERTURBATION = 3, 2.0**-21


def _int8_copy(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    twin = copy.deepcopy(model)
    return twin, use_backend(twin, "int8")


@torch.no_grad()
def _one_at_a_time(model: nn.Module, data) -> torch.Tensor:
    return torch.cat([model(data.x[i:i + 1], data.timesteps[i:i + 1], **data.cond_of(torch.tensor([i]))).sample
                      for i in range(len(data.x))])


def _self_agreement_db(model: nn.Module, data, reference: torch.Tensor) -> float:
    """The median SQNR against ``reference`` (``model``'s own outputs) of ``model`` run one sample at a time and
    with every quantized layer's input moved by :data:`PERTURBATION` (relative: 4 float32 ulps, the int8 layers'
    own difference) in :data:`PERTURBED_DRAWS` seeded draws: last-bit differences in every layer, as int8 makes them."""
    runs = [_one_at_a_time(model, data)]
    layers = [m for m in model.modules() if isinstance(m, QuantWeightMixin) and m.act_quant is not None]
    for seed in range(PERTURBED_DRAWS):
        generator = torch.Generator().manual_seed(seed)

        def nudge(layer: nn.Module, args: tuple) -> tuple:
            return (args[0] * (1 + PERTURBATION * torch.randn(args[0].shape, generator=generator)), *args[1:])

        handles = [layer.register_forward_pre_hook(nudge) for layer in layers]
        runs.append(outputs(model, data))
        for handle in handles:
            handle.remove()
    return statistics.median(sqnr_db(reference, run) for run in runs)


@pytest.fixture(scope="module")
def w8a7(unet: nn.Module, calibration) -> nn.Module:
    """7-bit activations: any int8 weight keeps int16 pair sums exact, so every layer runs on a CPU without VNNI."""
    return quantized_copy(unet, calibration, weight_bits=8, act_bits=7)


W8A8 = [pytest.param(name, marks=needs_exact_int8) for name in ("w8a8", "w8a8_grouped", "w8a8_dynamic", "cond_w8a8",
                                                                 "cond_w8a8_dynamic_gptq", "cond_w8a8_grouped")]


@pytest.mark.parametrize("fixture", [*W8A8[:5], "w4a8", "w8a7", "without-vnni-w4a8", "without-vnni-w8a7"])
def test_int8_model_agrees_with_fake_quant(fixture: str, request: pytest.FixtureRequest,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer with a quantized input runs int8; without VNNI all but the few whose int16 pair sums would
    overflow (8-bit layers kept at 8-bit activations), on oneDNN's kernels only (no ``torch._int_mm``)."""
    if fixture.startswith("without-vnni-"):
        pretend_no_vnni(monkeypatch)
        fixture = fixture.removeprefix("without-vnni-")
    without_vnni = not int8_backend.exact_int8_cpu()
    model = request.getfixturevalue(fixture)
    cond = fixture.startswith("cond")
    data = request.getfixturevalue("cond_held_out" if cond else "held_out")
    fp = outputs(request.getfixturevalue("cond_unet" if cond else "unet"), data)
    twin, execution = _int8_copy(model)
    assert any(isinstance(m, (Int8Conv2d, Int8Linear)) for m in twin.modules())
    left = [name for name, m in twin.named_modules() if isinstance(m, QuantWeightMixin) and m.act_quant is not None]
    if without_vnni:
        assert all(execution[name].startswith(f"fake: {NO_VNNI}, which 8-bit activations") for name in left), execution
        assert len(left) <= 2 and not any(isinstance(m, Int8Matmul) for m in twin.modules())
    else:
        assert not left, execution
    # static ranges run on oneDNN's linear kernel, dynamic ones on torch._int_mm
    assert all((m.onednn is None) == m.act_quant.dynamic for m in twin.modules() if isinstance(m, Int8Linear))
    fake, int8 = outputs(model, data), outputs(twin, data)
    assert sqnr_db(fake, int8) >= _self_agreement_db(model, data, fake) - MARGIN_DB
    assert abs(sqnr_db(fp, fake) - sqnr_db(fp, int8)) <= ACCURACY_DB


@pytest.mark.parametrize("fixture", [*W8A8[:3], *W8A8[4:], "w4a8", "without-vnni-w4a8"])
def test_every_converted_layer_agrees_with_its_fake_twin(fixture: str, request: pytest.FixtureRequest,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if fixture.startswith("without-vnni-"):
        pretend_no_vnni(monkeypatch)
        fixture = fixture.removeprefix("without-vnni-")
    model = request.getfixturevalue(fixture)
    data = request.getfixturevalue("cond_held_out" if fixture.startswith("cond") else "held_out")
    twin, _ = _int8_copy(model)
    fake_layers = dict(model.named_modules())
    seen = []

    def compare(name: str):
        def hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen.append((name, sqnr_db(fake_layers[name](args[0]), out)))
        return hook

    for name, module in twin.named_modules():
        if isinstance(module, (Int8Conv2d, Int8Linear)):
            module.register_forward_hook(compare(name))
    index = torch.nonzero(data.timesteps == data.timesteps[-1]).flatten()[:4]  # one timestep group
    with torch.no_grad():
        model(data.x[index], data.timesteps[index], **data.cond_of(index))  # selects the fake model's group too
        twin(data.x[index], data.timesteps[index], **data.cond_of(index))
    assert len(seen) == sum(isinstance(m, (Int8Conv2d, Int8Linear)) for m in twin.modules())
    assert min(db for _, db in seen) >= LAYER_DB, sorted(seen, key=lambda item: item[1])[:3]


@needs_exact_int8
def test_pointwise_convolutions_as_gemms_agree_with_their_fake_twins(w8a8: nn.Module, held_out) -> None:
    """The CUDA route for 1x1 convolutions with calibrated ranges (split skip halves included), run here on the CPU."""
    layers = {name: m for name, m in w8a8.named_modules()
              if isinstance(m, QuantConv2d) and m.kernel_size == (1, 1) and m.act_quant is not None}
    inputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0]))
               for name, m in layers.items()]
    index = torch.nonzero(held_out.timesteps == held_out.timesteps[-1]).flatten()[:4]
    with torch.no_grad():
        w8a8(held_out.x[index], held_out.timesteps[index])
        for handle in handles:
            handle.remove()
        assert any(m.split is not None for m in layers.values()) and set(inputs) == set(layers)
        for name, layer in layers.items():
            assert sqnr_db(layer(inputs[name]), Int8Conv2d(layer, gemm=True)(inputs[name])) >= LAYER_DB, name


@pytest.mark.parametrize("config", [pytest.param(dict(weight_symmetric=True, act_symmetric=True), marks=needs_exact_int8),
                                    dict(weight_bits=3, act_bits=6), dict(weight_bits=8, act_bits=4)])
def test_other_recipes_agree_too(config: dict, unet: nn.Module, calibration, held_out) -> None:
    model = quantized_copy(unet, calibration, **config)
    twin, execution = _int8_copy(model)
    assert sum(where == "int8" for where in execution.values()) > 10
    fp, fake, int8 = outputs(unet, held_out), outputs(model, held_out), outputs(twin, held_out)
    assert sqnr_db(fake, int8) >= _self_agreement_db(model, held_out, fake) - MARGIN_DB
    assert abs(sqnr_db(fp, fake) - sqnr_db(fp, int8)) <= ACCURACY_DB
    if config.get("weight_symmetric"):  # 8-bit codes centred on 128 fit int8 as they are
        assert not adds_weight_zero_point(twin)


@needs_exact_int8
def test_asymmetric_8bit_weights_add_their_zero_points_back(w8a8: nn.Module, w4a8: nn.Module,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tacdiff"):
        twin, _ = _int8_copy(w8a8)
    assert sum(adds_weight_zero_point(m) for m in twin.modules() if isinstance(m, (Int8Conv2d, Int8Linear))) > 10
    assert "--weight-symmetric" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tacdiff"):
        twin, _ = _int8_copy(w4a8)  # centred 4-bit codes always fit int8
    assert not adds_weight_zero_point(twin) and "--weight-symmetric" not in caplog.text


def test_an_uncalibrated_quantizer_keeps_its_layer_fake(w8a8: nn.Module) -> None:
    model = copy.deepcopy(w8a8)
    model.get_submodule("down_blocks.0.resnets.0.conv1").act_quant.enabled = False
    execution = use_backend(model, "int8")
    assert execution["down_blocks.0.resnets.0.conv1"] == ("fake: its activation quantizer was never calibrated "
                                                          "(the input runs unquantized)")


def test_a_converted_model_is_not_copied_saved_or_converted_again(w4a8: nn.Module, tmp_path) -> None:
    twin, _ = _int8_copy(w4a8)
    with pytest.raises(TypeError, match="copy the fake-quant model"):
        copy.deepcopy(twin)
    with pytest.raises(ValueError, match="save the fake-quant model"):
        save_quantized(twin, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="already runs on the int8 backend"):
        use_backend(twin, "fake")


@needs_exact_int8
def test_layers_the_int8_path_cannot_run_stay_fake_with_a_reason(w8a8_blocked: nn.Module, w8a8: nn.Module,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _, execution = _int8_copy(w8a8_blocked)
    assert "fake: block-scaled activations need a block-scaled GEMM" in execution.values()
    assert not any(where.startswith("int8") for where in execution.values())
    assert "runs no layer on integer kernels" in caplog.text and "block-scaled activations" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        twin, execution = _int8_copy(w8a8)
    assert "runs no layer" not in caplog.text
    weight_only = [name for name, where in execution.items() if "weight-only" in where]
    assert weight_only == ["conv_in"]  # its input is the model input, left unquantized by default
    attentions = [e.name for e in quant_state(w8a8).plan if e.kind == "attention"]
    assert attentions and all(execution[name] == ATTENTION_INT8 for name in attentions)
    summary = format_summary(twin)
    assert "runs" in summary.splitlines()[0] and "int8" in summary
    weights = [line for line in summary.splitlines() if line.startswith("weights: ")]
    assert weights == [line for line in format_summary(w8a8).splitlines() if line.startswith("weights: ")]


def test_int8_model_keeps_no_float_weights(w4a8: nn.Module) -> None:
    twin, _ = _int8_copy(w4a8)
    float_bytes = sum(p.numel() * p.element_size() for p in w4a8.parameters())
    int_bytes = sum(t.numel() * t.element_size() for t in [*twin.parameters(), *twin.buffers()])
    assert int_bytes < 0.45 * float_bytes


def test_unknown_backend_is_refused(w8a8: nn.Module) -> None:
    with pytest.raises(ValueError, match="choose one of fake, int8, auto"):
        use_backend(copy.deepcopy(w8a8), "int4")


@pytest.mark.parametrize("backend", ["int8", "auto"])
def test_embedding_tables_keep_only_their_codes_and_look_up_the_same_rows(backend: str, tmp_path) -> None:
    """A DiT's class-embedding tables (quantize_embeddings) under both backends: codes only, rows dequantized per
    lookup, bit for bit the fake table's rows."""
    model = tiny_model("dit", out_channels=4)
    data = calibration_of(model, seed=0, num_samples=4, num_inference_steps=2, kept_steps=2,
                          cond=tiny_cond("dit", 4, seed=0))
    fake = quantized_copy(model, data, weight_bits=4, act_bits=8, quantize_embeddings=True)
    twin = copy.deepcopy(fake)
    execution = use_backend(twin, backend, cache=tmp_path)
    names = [name for name, m in fake.named_modules() if isinstance(m, QuantEmbedding)]
    assert names and all(execution[name] == "int8 (codes, rows dequantized per lookup)" for name in names)
    labels = torch.tensor([[0, 3], [10, 3]])
    for name in names:
        table, codes_only = fake.get_submodule(name), twin.get_submodule(name)
        assert isinstance(codes_only, Int8Embedding)
        assert torch.equal(codes_only(labels), table(labels))
        assert weight_bytes(codes_only) < weight_bytes(table) / 2


@pytest.mark.parametrize("keys", [24, 77])  # a multiple of 8 and not
@pytest.mark.parametrize("bits", [8, 6])
def test_attention_values_on_int8_equal_the_fake_product(keys: int, bits: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_backend, "MIN_KEYS", 1)
    attn = attention_with_ranges(heads=3, head_dim=8, bits=bits)
    generator = torch.Generator().manual_seed(keys)
    probs = torch.randn(3, 40, keys, generator=generator).mul_(3).softmax(-1)
    value = torch.randn(3, keys, 8, generator=generator) * 2
    fake = torch.bmm(attn.probs_quant(probs), attn.v_quant(value))
    product = Int8AttentionValues(attn)(value)
    torch.testing.assert_close(product(probs, slice(None)), fake, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(product(probs[1:], slice(1, 3)), fake[1:], rtol=1e-5, atol=1e-6)


def test_blocked_attention_on_int8_matches_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of heads and query rows, each on the integer product, against the whole matrix in float."""
    attn = attention_with_ranges(heads=4, head_dim=8)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, 8, generator=generator) for n in (48, 32, 32))
    with torch.no_grad():
        fake = quantized_attention(attn, q, k, v)
        attn.values_kernel = Int8AttentionValues(attn)
        monkeypatch.setattr(attention, "ATTENTION_BLOCK", 5 * 32)
        calls = []
        monkeypatch.setattr(torch, "_int_mm", lambda a, b, real=torch._int_mm: calls.append(1) or real(a, b))
        below = quantized_attention(attn, q, k, v)  # 32 keys < MIN_KEYS: float
        assert not calls
        monkeypatch.setattr(int8_backend, "MIN_KEYS", 32)
        int8_blocks = quantized_attention(attn, q, k, v)
    assert len(calls) == 4 * -(-48 // 5)  # one GEMM per head in every block of 5 query rows
    torch.testing.assert_close(below, fake, rtol=0, atol=3 / 255)
    assert sqnr_db(fake, int8_blocks) >= LAYER_DB


@needs_exact_int8
def test_attention_with_dynamic_ranges_stays_fake_with_a_reason(w8a8_dynamic: nn.Module) -> None:
    _, execution = _int8_copy(w8a8_dynamic)
    attentions = [e.name for e in quant_state(w8a8_dynamic).plan if e.kind == "attention"]
    assert attentions and all("fake: attention matmul operands (dynamic ranges" in execution[name]
                              for name in attentions)
    assert values_kernel_reason(attention_with_ranges(2, 8), torch.device("meta")) is not None


def test_without_vnni_what_int16_pair_sums_cannot_hold_stays_fake_with_the_reason(
        w8a8: nn.Module, w8a8_dynamic: nn.Module, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """8-bit activations times full-range 8-bit weights, dynamic and per-token ranges (torch._int_mm) and the
    attention product (torch._int_mm) all stay fake on a CPU without VNNI or AMX, each saying why."""
    pretend_no_vnni(monkeypatch)
    with caplog.at_level(logging.WARNING):
        _, execution = _int8_copy(w8a8)
    attentions = [e.name for e in quant_state(w8a8).plan if e.kind == "attention"]
    layers = [name for name in execution if name not in attentions and name != "conv_in"]
    assert layers and all(execution[name].startswith(f"fake: {NO_VNNI}, which 8-bit activations times centred "
                                                     "weights up to 128 overflow") for name in layers)
    assert attentions and all(execution[name].endswith("torch._int_mm is not exact there)") for name in attentions)
    assert "runs no layer on integer kernels" in caplog.text
    assert "quantize with --w-bits 6 (of these, the most accurate on the bundled model) or --a-bits 7" in caplog.text
    _, execution = _int8_copy(w8a8_dynamic)
    linears = [name for name, m in w8a8_dynamic.named_modules() if isinstance(m, nn.Linear) and m.act_quant is not None]
    assert linears and all("torch._int_mm, which dynamic and per-token ranges need, is not exact there" in
                           execution[name] for name in linears)
