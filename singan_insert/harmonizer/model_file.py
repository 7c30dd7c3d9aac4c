"""The on-disk format of models and checkpoints: tensors in safetensors, metadata in JSON.

A file written here is a plain `safetensors <https://huggingface.co/docs/safetensors>`_
file. Its header metadata holds one key, ``"singan_insert"``, whose value is a JSON document::

    {"format": "<kind>", "format_version": 1, "package_version": "0.1.0", ...}

``kind`` tells a harmonizer model (``"singan-insert-harmonizer"``) from a training checkpoint
(``"singan-insert-checkpoint"``) or a stage model (``"singan-insert-cyclegan"``, ...).
Loading never unpickles anything: safetensors only holds raw tensor bytes, so opening a file
cannot run code. Writes are atomic (a temporary file in the same folder, then ``os.replace``),
so an interrupted write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from singan_insert._version import __version__
from singan_insert.errors import ModelFileError
from singan_insert.io import atomic_write_bytes

FORMAT_VERSION = 1
_METADATA_KEY = "singan_insert"
_SAFETENSORS_MAGIC_MAX_HEADER = 100 * 1024 * 1024


def save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    kind: str,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``tensors`` and JSON-serialisable ``metadata`` atomically as a safetensors file.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        tensors: name -> tensor; tensors are moved to the CPU and made contiguous.
        kind: the file kind written into the header, e.g. ``"singan-insert-harmonizer"``.
        metadata: any JSON-serialisable dictionary stored beside the tensors.
    """
    from safetensors.torch import save

    header = {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        **(metadata or {}),
    }
    cpu_tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    data = save(cpu_tensors, metadata={_METADATA_KEY: json.dumps(header)})
    atomic_write_bytes(path, data)
    return Path(path)


def load_tensors(
    path: str | os.PathLike,
    kind: str,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`, checking its kind and format version.

    Raises:
        ModelFileError: the file is missing, is not a safetensors file (for example a pickle),
            is truncated or corrupt, was written by another program, holds another kind of
            model, or has a format version this package cannot read.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Model file {str(path)!r} does not exist.")
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            raw_meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for bad files
        raise ModelFileError(
            f"Could not read {str(path)!r} as a safetensors file ({error}). The file is corrupt "
            "or truncated: re-create it (re-run training, or copy it again)."
        ) from error
    if _METADATA_KEY not in raw_meta:
        raise ModelFileError(
            f"{str(path)!r} is a safetensors file, but not one written by singan-insert "
            "(its header has no 'singan_insert' metadata). Train a model with "
            "`singan-insert train` or pass a file this package wrote."
        )
    try:
        meta = json.loads(raw_meta[_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{str(path)!r} has corrupt metadata: {error}.") from error
    if meta.get("format") != kind:
        raise ModelFileError(
            f"{str(path)!r} holds a {meta.get('format')!r}, but a {kind!r} was expected."
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{str(path)!r} has format version {version}; this singan-insert "
            f"({__version__}) reads version {FORMAT_VERSION}. Use the singan-insert version "
            f"that wrote it (package_version={meta.get('package_version')!r}) or re-train."
        )
    return tensors, meta


def _check_safetensors_header(path: Path) -> None:
    """Fail early, with a useful message, on files that cannot be safetensors at all."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        raise ModelFileError(f"{str(path)!r} is empty or truncated ({size} bytes).")
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or header_len > _SAFETENSORS_MAGIC_MAX_HEADER:
        hint = " It looks like a pickle (torch.save) file;" if head[:1] == b"\x80" or head[:2] == b"PK" else ""
        raise ModelFileError(
            f"{str(path)!r} is not a safetensors file.{hint} singan-insert never unpickles "
            "files; convert or re-train the model with this package."
        )
    if 8 + header_len > size:
        raise ModelFileError(
            f"{str(path)!r} is truncated (header says {header_len} bytes, file has {size})."
        )


def state_dict_to_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Flatten a module's state dict under ``prefix`` for :func:`save_tensors`."""
    return {f"{prefix}.{name}": t for name, t in module.state_dict().items()}


def tensors_to_state_dict(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_dict_to_tensors`: the entries under ``prefix``, unprefixed."""
    start = len(prefix) + 1
    return {name[start:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}


def optimizer_to_tensors(
    prefix: str, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors and JSON (for resumable checkpoints)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def tensors_to_optimizer(
    prefix: str,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    json_part: dict[str, Any],
) -> None:
    """Restore an optimizer saved with :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in json_part["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json_part["param_groups"]})
