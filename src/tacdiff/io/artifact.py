"""Quantized-model artifacts: a folder with the diffusers ``config.json`` and one safetensors file.

``quantized.safetensors`` holds the bit-packed integer weight codes, their scales and zero
points, activation ranges, every remaining float tensor, and metadata (format version,
model class, :class:`QuantConfig`, layer plan, code shapes). Loading rebuilds the model
from its config, re-installs the quantized layers and reproduces outputs bit for bit.
No pickle is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

import tacdiff
from tacdiff.io.atomic import write_dir_atomically
from tacdiff.quant import primitives as P
from tacdiff.models.kinds import MODEL_KINDS
from tacdiff.quant.apply import LayerPlan, install, quant_state
from tacdiff.quant.config import QuantConfig
from tacdiff.quant.layers import ActQuantizer, QuantWeightMixin

FORMAT = "tacdiff-quantized-unet"
FORMAT_VERSION = "1"
WEIGHTS_NAME = "quantized.safetensors"


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes and bytes), for provenance."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_quantized(model: nn.Module, out_dir: str | Path, *, metadata: dict[str, str] | None = None,
                   overwrite: bool = False) -> Path:
    """Write a quantized model to the folder ``out_dir`` (atomically); return its path."""
    state = quant_state(model)
    tensors, shapes = _packed_state(model)
    enabled = [m.name for m in model.modules() if isinstance(m, ActQuantizer) and m.enabled]
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tacdiff_version": tacdiff.__version__,
        "model_class": type(model).__name__, "quant_config": state.config.to_json(),
        "plan": json.dumps([asdict(p) for p in state.plan]), "code_shapes": json.dumps(shapes),
        "enabled_act_quantizers": json.dumps(enabled), "compute_dtype": str(model.dtype).removeprefix("torch."),
        **(metadata or {}),
    }

    def fill(tmp: Path) -> None:
        model.save_config(tmp)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=meta)

    return write_dir_atomically(out_dir, fill, overwrite=overwrite)


def _packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The state dict with each quantized weight replaced by its bit-packed codes."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightMixin):
            del tensors[f"{name}.weight"]
            codes = tensors.pop(f"{name}.weight_codes")
            tensors[f"{name}.weight_codes"] = P.pack_codes(codes, module.w_bits)
            shapes[name] = list(codes.shape)
    return tensors, shapes


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an artifact folder (or its safetensors file); clear errors for foreign files."""
    file = _weights_file(path)
    try:
        with safe_open(file, framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error}); re-create it with tacdiff quantize")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not a tacdiff quantized model (format={meta.get('format')!r}); "
                         "pass a folder written by `tacdiff quantize`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format version {meta.get('format_version')!r}; this tacdiff reads "
                         f"version {FORMAT_VERSION}. Upgrade tacdiff or re-quantize the model")
    return meta


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`, in eval mode on ``device``.

    ``dtype`` is the compute dtype; by default the one the model had when it was saved (float32
    for artifacts that do not record it). The quantization parameters stay float32, as
    :func:`tacdiff.quantize` made them.
    """
    meta = read_metadata(path)
    if dtype is None:
        dtype = getattr(torch, meta.get("compute_dtype", "float32"))
    kind = MODEL_KINDS.get(meta["model_class"])
    if kind is None:
        raise ValueError(f"unsupported model class {meta['model_class']!r} in {path}")
    model = kind.cls.from_config(kind.cls.load_config(_folder(path))).to(device).eval()
    if dtype != model.dtype:  # diffusers warns on any dtype cast, so cast only when needed
        model.to(dtype)
    config = QuantConfig.from_json(meta["quant_config"])
    install(model, config, [LayerPlan(**p) for p in json.loads(meta["plan"])])
    tensors = load_file(_weights_file(path))
    for name, shape in json.loads(meta["code_shapes"]).items():
        bits = model.get_submodule(name).w_bits
        tensors[f"{name}.weight_codes"] = P.unpack_codes(tensors[f"{name}.weight_codes"], bits, tuple(shape))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    expected_missing = {f"{name}.weight" for name in json.loads(meta["code_shapes"])}
    if unexpected or set(missing) != expected_missing:
        raise ValueError(f"{path} does not match its model config (missing {sorted(set(missing) - expected_missing)}, "
                         f"unexpected {sorted(unexpected)}); the artifact is corrupt")
    enabled = set(json.loads(meta["enabled_act_quantizers"]))
    for module in model.modules():
        if isinstance(module, QuantWeightMixin):
            module.refresh_weight()
        elif isinstance(module, ActQuantizer):
            module.enabled = module.name in enabled
    return model


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def _weights_file(path: str | Path) -> Path:
    file = _folder(path) / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {_folder(path)}; pass the folder written by `tacdiff quantize`")
    return file
