"""tacdiff's safetensors files: one reader checks that a file is the kind of file expected, one writer makes
the same tensors and metadata the same bytes.

Artifacts, correction tables and FID assets all name their kind in the safetensors metadata
(``format``, and ``format_version`` where the layout may change); :func:`read_safetensors`
turns every way a path can fail to be that kind into one clear error naming the path and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its JSON header's length, little-endian u64


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the header's keys put in sorted order in place, so that the same
    tensors and metadata always give the same bytes (safetensors writes its metadata in hash order, which
    changes from process to process). The sorted header is the same JSON, so it has the same length."""
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(HEADER_LENGTH_BYTES), "little")
        header = json.loads(handle.read(length))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # always, for the JSON safetensors writes; else the file stays as written
            handle.seek(HEADER_LENGTH_BYTES)
            handle.write(text.ljust(length))


def safetensors_format(path: str | Path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata; None for a file that is not one or has none."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return None


def read_safetensors(path: str | Path, *, kind: str, fmt: str, fix: str, version: str | None = None,
                     tensors: bool = True) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and (unless ``tensors`` is false) the tensors of a ``kind`` file whose format is ``fmt``.

    Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for a folder, an unreadable
    file, another format or (with ``version``) another format version; each message names the
    path and ends with ``fix`` (e.g. "recalibrate").
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {kind}; {fix}")
    if not path.is_file():
        raise FileNotFoundError(f"{kind} not found: {path}; {fix}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            found = {name: handle.get_tensor(name) for name in handle.keys()} if tensors else {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(error).split())}); {fix}") \
            from None
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a {kind} (format={meta.get('format')!r}); {fix}")
    if version is not None and meta.get("format_version") != version:
        raise ValueError(f"{path} has {kind} format version {meta.get('format_version')!r}; this tacdiff reads "
                         f"version {version}. Upgrade tacdiff or {fix}")
    return meta, found
