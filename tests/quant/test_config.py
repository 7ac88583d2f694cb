"""QuantConfig validation, its JSON form (stored in artifact metadata) and the "w4a8" bits notation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tacdiff.quant.config import QuantConfig, parse_bits, parse_setting, setting_label

INVALID = [
    ("weight_bits", 1), ("weight_bits", 9), ("weight_bits", True), ("weight_bits", 4.0), ("weight_bits", "8"),
    ("weight_bits", None),
    ("act_bits", 1), ("act_bits", 9), ("act_bits", False), ("act_bits", 8.0),
    ("first_last_bits", 0), ("first_last_bits", 16), ("first_last_bits", 8.0),
    ("weight_range", "max"), ("weight_range", None), ("weight_range", "dynamic"), ("act_range", "entropy"),
    ("act_range", "MSE"),
    ("weight_rounding", "ada"), ("weight_rounding", "RTN"),
    ("act_percentile", 50.0), ("act_percentile", 100.5), ("act_percentile", float("nan")), ("act_percentile", 0),
    ("timestep_groups", 0), ("timestep_groups", -2), ("timestep_groups", 2.0), ("timestep_groups", True),
    ("timestep_groups", 1001),
    ("num_train_timesteps", 0), ("num_train_timesteps", 10.5),
    ("adaround_iters", 0), ("adaround_iters", -5), ("adaround_iters", 1.5),
    ("adaround_batch_size", 0), ("adaround_batch_size", 2.0),
    ("exclude", "time_embedding.*"),
    ("act_block_size", 0), ("act_block_size", 32.0), ("act_block_size", True),
]

# Wrong values that once slipped through: a truthy string such as "false" would turn symmetric
# quantization *on*, a NaN learning rate would poison learned rounding.
UNVALIDATED = [
    ("weight_symmetric", "false"), ("act_symmetric", 1), ("quantize_model_input", "yes"),
    ("split_shortcut", None), ("quantize_attention_matmuls", "no"),
    ("adaround_lr", 0.0), ("adaround_lr", -1e-2), ("adaround_lr", float("nan")), ("adaround_lr", "0.01"),
    ("seed", -1), ("seed", 1.5), ("seed", None),
    ("act_percentile", "99"), ("exclude", None), ("exclude", ("conv_in", 3)),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_fields_raise_value_errors_naming_them(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as error:
        QuantConfig(**{field: value})
    assert repr(value) in str(error.value) or field == "exclude", "the message shows the bad value"


@pytest.mark.parametrize("field, value", UNVALIDATED, ids=[f"{f}={v!r}" for f, v in UNVALIDATED])
def test_every_field_is_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_dynamic_ranges_refuse_timestep_groups_naming_both() -> None:
    with pytest.raises(ValueError, match="timestep_groups.*act_range='dynamic'"):
        QuantConfig(act_range="dynamic", timestep_groups=4)
    QuantConfig(act_range="dynamic", timestep_groups=1)


def test_block_scaled_ranges_need_dynamic_ranges_naming_both() -> None:
    with pytest.raises(ValueError, match="act_block_size.*act_range='dynamic'"):
        QuantConfig(act_block_size=32)
    QuantConfig(act_range="dynamic", act_block_size=32)


def test_defaults_and_valid_edge_values_are_accepted() -> None:
    QuantConfig()
    QuantConfig(weight_bits=2, act_bits=None, first_last_bits=None, act_percentile=100.0)
    QuantConfig(weight_bits=8, act_bits=2, timestep_groups=1000, num_train_timesteps=1000)
    assert QuantConfig(exclude=["conv_in", "time_embedding.*"]).exclude == ("conv_in", "time_embedding.*")


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().weight_bits = 4  # type: ignore[misc]


@pytest.mark.parametrize("config", [
    QuantConfig(),
    QuantConfig(weight_bits=4, act_bits=None, weight_symmetric=True, weight_range="minmax", first_last_bits=None,
                exclude=("conv_in", "*.attentions.*"), split_shortcut=False, timestep_groups=4,
                num_train_timesteps=500, weight_rounding="adaround", adaround_iters=7, adaround_lr=3e-3,
                adaround_batch_size=5, seed=11, act_percentile=99.5, act_range="percentile",
                quantize_model_input=True, quantize_attention_matmuls=False, act_symmetric=True),
])
def test_json_roundtrip(config: QuantConfig) -> None:
    text = config.to_json()
    assert json.loads(text)["weight_bits"] == config.weight_bits
    again = QuantConfig.from_json(text)
    assert again == config and isinstance(again.exclude, tuple)
    assert again.to_json() == text


def test_unknown_fields_are_rejected() -> None:
    data = json.loads(QuantConfig().to_json())
    data["group_size"] = 128
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig.from_json(json.dumps(data))
    with pytest.raises(TypeError):
        QuantConfig(group_size=128)  # type: ignore[call-arg]


def test_from_json_validates_values() -> None:
    data = json.loads(QuantConfig().to_json())
    data["act_bits"] = 12
    with pytest.raises(ValueError, match="act_bits"):
        QuantConfig.from_json(json.dumps(data))


def test_from_json_fills_missing_fields_with_defaults() -> None:
    assert QuantConfig.from_json(json.dumps({"weight_bits": 4})) == QuantConfig(weight_bits=4)


@pytest.mark.parametrize("text", ["w4", "a8w4", "w1a8", "w4a9", ""])
def test_parse_bits_rejects(text):
    with pytest.raises(ValueError, match="w4a8"):
        parse_bits(text)


def test_parse_bits():
    assert parse_bits("W3A8") == (3, 8)


@pytest.mark.parametrize("text, expected", [("w8a8", (8, 8, False)), ("W8A8-sym", (8, 8, True)),
                                            (" w4a6 ", (4, 6, False))])
def test_parse_setting(text: str, expected: tuple[int, int, bool]) -> None:
    assert parse_setting(text) == expected
    assert setting_label(QuantConfig(*expected[:2], weight_symmetric=expected[2])) == text.strip().lower()


@pytest.mark.parametrize("text", ["w8a8sym", "w8a8-symmetric", "sym", "w9a8-sym"])
def test_parse_setting_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="w8a8-sym"):
        parse_setting(text)
