"""Quantized-model artifacts: a folder with the diffusers ``config.json`` and one safetensors file.

``quantized.safetensors`` holds the bit-packed integer weight codes, their scales and zero
points, activation ranges, every remaining float tensor, and metadata (format version,
model class, :class:`QuantConfig`, layer plan, code shapes, a checksum of the tensors).
Loading validates all of it against the model rebuilt from the config (one clear
``ValueError`` per problem), re-installs the quantized layers and reproduces outputs bit for
bit. No pickle is involved anywhere.

An artifact quantized from a pipeline may also hold weight-only quantized components beside the
denoiser, one file each (``text_encoder.safetensors``, ``vae_decoder.safetensors``, same format):
they are applied to the full-precision component loaded from the pipeline folder
(:func:`load_component`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import no_init_weights
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import tacdiff
from tacdiff.backends import use_backend
from tacdiff.backends.int8 import is_converted
from tacdiff.devices import check_device
from tacdiff.io.atomic import write_dir_atomically
from tacdiff.io.formats import read_safetensors, safetensors_format, save_safetensors
from tacdiff.quant import primitives as P
from tacdiff.models.kinds import MODEL_KINDS
from tacdiff.quant.apply import LayerPlan, install, quant_state
from tacdiff.quant.config import QuantConfig
from tacdiff.quant.layers import ActQuantizer, QuantWeightMixin

FORMAT = "tacdiff-quantized-unet"
FORMAT_VERSION = "1"
WEIGHTS_NAME = "quantized.safetensors"
CONFIG_NAME = "config.json"
CHECKSUM_KEY = "content_sha256"
REQUIRED_KEYS = ("model_class", "quant_config", "plan", "code_shapes", "enabled_act_quantizers")
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
MODULE_KINDS = {"conv": nn.Conv2d, "linear": nn.Linear, "embedding": nn.Embedding, "attention": Attention}
FIX = "re-create it with tacdiff quantize"
COMPONENT_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder")
"""Pipeline components an artifact may hold quantized, each as ``<name>.safetensors`` (SD3 has three text
encoders)."""
COMPONENTS_KEY = "components"
"""Metadata of ``quantized.safetensors``: ``{component: checksum of its file}`` for the components it comes with."""


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def content_sha256(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    """SHA-256 over an artifact's tensors and its metadata (all but the checksum entry itself)."""
    digest = hashlib.sha256(tensors_sha256(tensors).encode())
    digest.update(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes and bytes), for provenance."""
    return tensors_sha256(model.state_dict())


def save_quantized(model: nn.Module, out_dir: str | Path, *, metadata: dict[str, str] | None = None,
                   components: Mapping[str, nn.Module] | None = None, overwrite: bool = False) -> Path:
    """Write a quantized model to the folder ``out_dir`` (atomically); return its path.

    ``components`` maps names of :data:`COMPONENT_NAMES` to quantized pipeline components (see
    :func:`tacdiff.quant.apply.quantize_weights_only`), each written to ``<name>.safetensors``.
    """
    if is_converted(model):
        raise ValueError("this model runs on the int8 backend, whose packed weights are not an artifact; save the "
                         "fake-quant model (load it with backend='fake') instead")
    unknown = sorted(set(components or {}) - set(COMPONENT_NAMES))
    if unknown:
        raise ValueError(f"unknown components {unknown}; an artifact holds {', '.join(COMPONENT_NAMES)}")
    files = {f"{name}.safetensors": _contents(part, {"component": name}) for name, part in (components or {}).items()}
    record = {name.removesuffix(".safetensors"): meta[CHECKSUM_KEY] for name, (_, meta) in files.items()}
    files[WEIGHTS_NAME] = _contents(model, {**(metadata or {}), **({COMPONENTS_KEY: json.dumps(record)}
                                                                    if record else {})})

    def fill(tmp: Path) -> None:
        model.save_config(tmp)
        for name, (tensors, meta) in files.items():
            save_safetensors(tensors, tmp / name, meta)

    return write_dir_atomically(out_dir, fill, overwrite=overwrite, recognise=is_artifact_folder,
                                what="quantized artifact")


def _contents(model: nn.Module, metadata: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The packed tensors of a quantized module and its metadata (recipe, ``metadata``, checksum)."""
    state = quant_state(model)
    tensors, shapes = _packed_state(model)
    enabled = [m.name for m in model.modules() if isinstance(m, ActQuantizer) and m.enabled]
    dtype = next(model.parameters()).dtype
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tacdiff_version": tacdiff.__version__,
        "model_class": type(model).__name__, "quant_config": state.config.to_json(),
        "plan": json.dumps([asdict(p) for p in state.plan]), "code_shapes": json.dumps(shapes),
        "enabled_act_quantizers": json.dumps(enabled), "compute_dtype": str(dtype).removeprefix("torch."),
        **metadata,
    }
    meta[CHECKSUM_KEY] = content_sha256(tensors, meta)
    return tensors, meta


def is_artifact_folder(path: Path) -> bool:
    """Whether ``path`` holds an artifact (its tensors perhaps corrupt, its metadata readable) and nothing else,
    so ``overwrite`` may replace it."""
    names = {entry.name for entry in path.iterdir()} if path.is_dir() else set()
    ours = {WEIGHTS_NAME, *(f"{name}.safetensors" for name in COMPONENT_NAMES)}
    return (WEIGHTS_NAME in names and names <= ours | {CONFIG_NAME}
            and all(safetensors_format(path / name) == FORMAT for name in names & ours))


def _untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict without the later names of tied tensors (T5's ``encoder.embed_tokens.weight`` is
    its ``shared.weight``): loading the first name fills both, as they share storage."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in seen:
            seen.add(key)
            state[name] = tensor
    return state


def _packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The state dict (tied tensors once) with each quantized weight replaced by its bit-packed codes."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in _untied_state(model).items()}
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightMixin):
            del tensors[f"{name}.weight"]
            codes = tensors.pop(f"{name}.weight_codes")
            tensors[f"{name}.weight_codes"] = P.pack_codes(codes, module.w_bits)
            shapes[name] = list(codes.shape)
    return tensors, shapes


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an artifact folder (or its safetensors file); clear errors for foreign or incomplete files."""
    return _file_metadata(_weights_file(path))


def _file_metadata(file: Path) -> dict[str, str]:
    """The metadata of one artifact safetensors file (the denoiser's or a component's), checked."""
    meta, _ = read_safetensors(file, kind="tacdiff quantized model", fmt=FORMAT, version=FORMAT_VERSION,
                               fix="pass a folder written by `tacdiff quantize`", tensors=False)
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise _corrupt(file, f"its metadata lacks {', '.join(missing)}")
    return meta


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                   verify: bool = True, backend: str = "fake") -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`, in eval mode on ``device``.

    ``dtype`` is the compute dtype; by default the one the model had when it was saved (float32
    for artifacts that do not record it). The quantization parameters stay float32, as
    :func:`tacdiff.quantize` made them. ``verify`` compares the tensors and metadata with the
    checksum recorded when the artifact was written (artifacts without one are not verified); every
    tensor is checked against the rebuilt model either way. Problems raise ``ValueError``
    (``FileNotFoundError`` for missing files) naming the file and the fix. ``backend`` says how the
    quantized layers execute (:func:`tacdiff.backends.use_backend`: ``fake``, ``int8`` or ``auto``).
    """
    check_device(device)
    file = _weights_file(path)
    meta, recipe, tensors = _read_checked(file, verify)
    model = _build_model(file.parent, recipe.model_class, file).to(device).eval()
    dtype = recipe.compute_dtype if dtype is None else dtype
    if dtype != model.dtype:  # diffusers warns on any dtype cast, so cast only when needed
        model.to(dtype)
    _apply(model, recipe, tensors, file)
    quant_state(model).source_sha256 = meta.get("source_sha256")
    use_backend(model, backend)
    return model


def component_files(path: str | Path) -> dict[str, Path]:
    """The quantized components an artifact folder holds, ``{name: file}``: exactly those its
    ``quantized.safetensors`` records, each the file written with it (by checksum), else ``ValueError``."""
    file = _weights_file(path)
    recorded = _json(_file_metadata(file).get(COMPONENTS_KEY, "{}"), dict, file, f"its metadata {COMPONENTS_KEY!r}")
    present = {name: file.parent / f"{name}.safetensors" for name in COMPONENT_NAMES
               if (file.parent / f"{name}.safetensors").is_file()}
    for name in sorted(set(recorded) | set(present)):
        if name not in present:
            raise ValueError(f"{file.parent} was written with a quantized {name} but {name}.safetensors is missing; "
                             f"restore it or {FIX}")
        if name not in recorded or _file_metadata(present[name]).get(CHECKSUM_KEY) != recorded[name]:
            raise ValueError(f"{present[name]} was not written with {file} (another artifact's, or a stray copy); "
                             f"remove or restore it, or {FIX}")
    return present


def load_component(module: nn.Module, file: str | Path, *, verify: bool = True) -> nn.Module:
    """Quantize the full-precision pipeline component ``module`` in place with the weights stored in ``file``
    (written by :func:`save_quantized` from the same component); validated as :func:`load_quantized` does."""
    file = Path(file)
    _, recipe, tensors = _read_checked(file, verify)
    if recipe.model_class != type(module).__name__:
        raise ValueError(f"{file} holds a quantized {recipe.model_class}, but the pipeline's component is a "
                         f"{type(module).__name__}; quantize the artifact again from this pipeline")
    _apply(module.eval(), recipe, tensors, file)
    return module


def _read_checked(file: Path, verify: bool) -> tuple[dict[str, str], "_Recipe", dict[str, torch.Tensor]]:
    """An artifact file's metadata, parsed recipe and tensors, the checksum verified if ``verify``."""
    meta = _file_metadata(file)
    recipe = _Recipe.from_metadata(meta, file)
    tensors = _read_tensors(file)
    if verify and recipe.checksum is not None and content_sha256(tensors, meta) != recipe.checksum:
        raise _corrupt(file, "its tensors or metadata do not match the checksum recorded when it was written")
    return meta, recipe, tensors


def _apply(model: nn.Module, recipe: "_Recipe", tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Install ``recipe``'s quantized layers in the float ``model`` and load the checked ``tensors``."""
    _install_plan(model, recipe.config, recipe.plan, file)
    _check_recorded_layers(model, recipe, file)
    _check_tensors(tensors, _expected_tensors(model), file)
    _check_values(tensors, model, file)
    _load_tensors(model, tensors, set(recipe.enabled))


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], enabled: set[str]) -> None:
    """Load checked ``tensors`` into the installed ``model``: unpack codes, dequantize, enable quantizers."""
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightMixin):
            key = f"{name}.weight_codes"
            tensors[key] = P.unpack_codes(tensors[key], module.w_bits, tuple(module.weight.shape))
    model.load_state_dict(tensors, strict=False)  # only the float weights of quantized layers are missing
    for module in model.modules():
        if isinstance(module, QuantWeightMixin):
            module.refresh_weight()
        elif isinstance(module, ActQuantizer):
            module.enabled = module.name in enabled


@dataclass(frozen=True)
class _Recipe:
    """The parsed metadata of an artifact: what to build and how it was quantized."""

    model_class: str
    config: QuantConfig
    plan: list[LayerPlan]
    code_shapes: dict[str, Any]
    enabled: list[str]
    compute_dtype: torch.dtype
    checksum: str | None

    @classmethod
    def from_metadata(cls, meta: dict[str, str], file: Path) -> "_Recipe":
        """Parse ``meta`` (from :func:`read_metadata`); one ``ValueError`` naming the first malformed key."""
        _json(meta["quant_config"], dict, file, "its metadata 'quant_config'")
        try:
            config = QuantConfig.from_json(meta["quant_config"])
        except (TypeError, ValueError) as error:
            raise _corrupt(file, f"its metadata 'quant_config' is malformed ({_one_line(error)})") from None
        dtype = COMPUTE_DTYPES.get(meta.get("compute_dtype", "float32"))
        if dtype is None:
            raise _corrupt(file, f"its metadata 'compute_dtype' is {meta['compute_dtype']!r}, not one of "
                                 f"{', '.join(COMPUTE_DTYPES)}")
        enabled = _json(meta["enabled_act_quantizers"], list, file, "its metadata 'enabled_act_quantizers'")
        if not all(isinstance(name, str) for name in enabled):
            raise _corrupt(file, "its metadata 'enabled_act_quantizers' is not a list of module names")
        return cls(meta["model_class"], config, _parse_plan(meta["plan"], file),
                   _json(meta["code_shapes"], dict, file, "its metadata 'code_shapes'"), enabled, dtype,
                   meta.get(CHECKSUM_KEY))


def _parse_plan(text: str, file: Path) -> list[LayerPlan]:
    """The layer plan stored as JSON; ``ValueError`` unless every entry is a well-formed :class:`LayerPlan`."""
    try:
        plan = [LayerPlan(**entry) for entry in _json(text, list, file, "its metadata 'plan'")]
    except TypeError as error:
        raise _corrupt(file, f"its metadata 'plan' has a malformed entry ({_one_line(error)})") from None
    for entry in plan:
        if not (isinstance(entry.name, str) and isinstance(entry.kind, str) and entry.kind in MODULE_KINDS
                and _is_split(entry.split)):
            raise _corrupt(file, f"its metadata 'plan' has a malformed entry {asdict(entry)}")
    return plan


def _is_split(split: object) -> bool:
    return split is None or (isinstance(split, int) and not isinstance(split, bool) and split > 0)


def _json(text: str | bytes, kind: type, file: Path, what: str) -> Any:
    """``text`` parsed as JSON of type ``kind`` (dict or list), else ``ValueError`` saying ``what`` is broken."""
    try:
        value = json.loads(text)
    except ValueError:  # also invalid UTF-8
        value = None
    if not isinstance(value, kind):
        raise _corrupt(file, f"{what} is not a JSON {'object' if kind is dict else 'array'}")
    return value


def _build_model(folder: Path, model_class: str, file: Path) -> nn.Module:
    """The (float) model described by ``folder``'s ``config.json``, which must name ``model_class``."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}; the artifact is incomplete: {FIX}")
    config = _json(config_file.read_bytes(), dict, config_file, "it")
    kind = MODEL_KINDS.get(model_class)
    if kind is None:
        raise _corrupt(file, f"its metadata names the unsupported model class {model_class!r} (tacdiff loads "
                             f"{', '.join(MODEL_KINDS)})")
    if "_class_name" not in config:
        raise _corrupt(config_file, "it has no '_class_name'")
    if config["_class_name"] != model_class:
        raise ValueError(f"{config_file} names the model class {config['_class_name']!r} but {file} holds a "
                         f"quantized {model_class}; restore {CONFIG_NAME} or {FIX}")
    try:
        with no_init_weights():  # every parameter is then loaded from the artifact or dequantized from its codes
            return kind.cls.from_config(config)
    except Exception as error:  # diffusers raises many types for bad configs; report them all the same way
        raise ValueError(f"{config_file} cannot build a {model_class} ({type(error).__name__}: "
                         f"{_one_line(error)}); restore {CONFIG_NAME} or {FIX}") from None


def _install_plan(model: nn.Module, config: QuantConfig, plan: list[LayerPlan], file: Path) -> None:
    """:func:`install` the quantized layers of ``plan`` after checking that it fits ``model``."""
    modules = dict(model.named_modules())
    for entry in plan:
        module = modules.get(entry.name)
        if module is None:
            raise ValueError(f"{file}'s plan names the module {entry.name!r}, which the {type(model).__name__} "
                             f"built from its {CONFIG_NAME} does not have; the artifact is corrupt: {FIX}")
        if not isinstance(module, MODULE_KINDS[entry.kind]):
            raise _corrupt(file, f"its plan quantizes {entry.name!r} as {entry.kind!r} but it is a "
                                 f"{type(module).__name__}")
        if entry.split is not None and (entry.kind == "attention" or entry.split >= module.weight.shape[1]):
            raise _corrupt(file, f"its plan splits the input of {entry.name!r} at {entry.split}, outside its channels")
    if len({entry.name for entry in plan}) < len(plan):
        raise _corrupt(file, "its plan names a module twice")
    try:
        install(model, config, plan, copy_state=False)  # every tensor comes from the artifact
    except ValueError as error:  # bits that the layers reject
        raise _corrupt(file, f"its plan does not fit the model ({_one_line(error)})") from None


def _check_recorded_layers(model: nn.Module, recipe: _Recipe, file: Path) -> None:
    """``ValueError`` unless the recorded code shapes and enabled quantizers match the installed ``model``."""
    shapes = {n: list(m.weight.shape) for n, m in model.named_modules() if isinstance(m, QuantWeightMixin)}
    for name in sorted(shapes.keys() | recipe.code_shapes.keys()):
        recorded, actual = recipe.code_shapes.get(name, "absent"), shapes.get(name, "absent")
        if recorded != actual:
            raise _corrupt(file, f"its metadata 'code_shapes' records {name!r} as {recorded} but the model "
                                 f"built from {CONFIG_NAME} has {actual}")
    unknown = sorted(set(recipe.enabled) - {m.name for m in model.modules() if isinstance(m, ActQuantizer)})
    if unknown:
        raise _corrupt(file, f"its metadata 'enabled_act_quantizers' names {unknown[:3]}, which the model lacks")


def _expected_tensors(model: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of every tensor an artifact of the (installed) ``model`` stores."""
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in _untied_state(model).items()}
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightMixin):
            del expected[f"{name}.weight"]
            packed_bytes = (module.weight.numel() * module.w_bits + 7) // 8  # as P.pack_codes writes them
            expected[f"{name}.weight_codes"] = (torch.uint8, (packed_bytes,))
    return expected


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   file: Path) -> None:
    """``ValueError`` unless ``tensors`` has exactly the expected names, dtypes (float: any float) and shapes."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise _corrupt(file, f"its tensors do not match its model config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    for name, (dtype, shape) in expected.items():
        found = tensors[name]
        kind_ok = found.is_floating_point() if dtype.is_floating_point else found.dtype == dtype
        if not kind_ok or tuple(found.shape) != shape:
            want = "a floating-point tensor" if dtype.is_floating_point else str(dtype)
            raise _corrupt(file, f"tensor {name!r} should be {want} of shape {list(shape)}, found "
                                 f"{found.dtype} of shape {list(found.shape)}")


def _check_values(tensors: dict[str, torch.Tensor], model: nn.Module, file: Path) -> None:
    """``ValueError`` unless every float tensor is finite and every quantization scale positive."""
    scales = {f"{n}.weight_scale" for n, m in model.named_modules() if isinstance(m, QuantWeightMixin)}
    scales |= {f"{n}.scale" for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    for name, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise _corrupt(file, f"tensor {name!r} holds NaN or inf")
        if name in scales and not (tensor > 0).all():
            raise _corrupt(file, f"scale tensor {name!r} holds values <= 0")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as error:
        raise _unreadable(file, error) from None


def _corrupt(file: Path, detail: str) -> ValueError:
    return ValueError(f"{file} is corrupt: {detail}; {FIX}")


def _unreadable(file: Path, error: Exception) -> ValueError:
    return ValueError(f"{file} is not a readable safetensors file ({_one_line(error)}); {FIX}")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def check_source(meta: dict[str, str], fp_model: nn.Module, name: str | Path) -> None:
    """Raise ``ValueError`` when the artifact records a source hash that ``fp_model`` does not have."""
    source = meta.get("source_sha256")
    if source and source != state_dict_sha256(fp_model):
        raise ValueError(f"the quantized artifact was made from another model ({meta.get('source_model', '?')}, "
                         f"sha256 {source[:12]}...) than --fp-model {name}; pass the model it was quantized from")


def recorded_scheduler_config(path: str | Path) -> dict[str, Any] | None:
    """The scheduler config an artifact recorded (None if none); ``ValueError`` unless it is a JSON object."""
    meta = read_metadata(path)
    if not meta.get("scheduler_config"):
        return None
    return _json(meta["scheduler_config"], dict, _weights_file(path), "its metadata 'scheduler_config'")


def _folder(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name != WEIGHTS_NAME:
        raise ValueError(f"{path} is a file, not a quantized artifact folder; pass the folder written by "
                         "`tacdiff quantize`")
    return path.parent if path.is_file() else path


def _weights_file(path: str | Path) -> Path:
    """The artifact's safetensors file; ``FileNotFoundError``, or ``ValueError`` for a full-precision model folder."""
    folder = _folder(path)
    file = folder / WEIGHTS_NAME
    if file.is_file():
        return file
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; pass the folder written by `tacdiff quantize`")
    denoisers = (folder, folder / "unet", folder / "transformer")
    if any((d / CONFIG_NAME).is_file() and any(d.glob("diffusion_pytorch_model*")) for d in denoisers):
        raise ValueError(f"{folder} is a full-precision diffusers model folder, not a tacdiff quantized artifact; "
                         f"quantize it first with `tacdiff quantize {folder} --out ...`")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}; pass the folder written by `tacdiff quantize`")
