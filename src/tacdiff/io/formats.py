"""Reading tacdiff's safetensors files: one reader checks that a file is the kind of file expected.

Artifacts, correction tables and FID assets all name their kind in the safetensors metadata
(``format``, and ``format_version`` where the layout may change); :func:`read_safetensors`
turns every way a path can fail to be that kind into one clear error naming the path and the fix.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import Tensor


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
