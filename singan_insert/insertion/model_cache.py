"""The process-wide harmonizer cache: load a model file once per process and device.

Transforms and batch workers hold only a model's path and call :func:`load_harmonizer` when they
need the network, so nothing heavy rides along in pickles, histories or ``DataLoader`` workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from singan_insert.devices import select_device
from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.model import MODEL_FILE_NAME, Harmonizer

__all__ = ["load_harmonizer", "resolve_model_file"]

# (resolved path, file mtime_ns, size, device, pid) -> Harmonizer. Keyed by pid so that a forked
# DataLoader worker loads its own copy instead of sharing the parent's torch state.
_MODEL_CACHE: dict[tuple[str, int, int, str, int], Harmonizer] = {}


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The model file of ``path`` (a file, or a training folder holding ``MODEL_FILE_NAME``)."""
    resolved = Path(path)
    if resolved.is_dir():
        resolved = resolved / MODEL_FILE_NAME
    if not resolved.is_file():
        raise SinganInsertError(
            f"The harmonizer model {os.fspath(path)!r} does not exist. Pass the path of a model "
            "file (or a training output folder) written by `singan-insert train`.")
    return resolved


def load_harmonizer(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> Harmonizer:
    """Load a harmonizer once per process and device (later calls return the same object).

    The file's modification time and size are part of the key, so a retrained model is reloaded.
    """
    resolved = resolve_model_file(path)
    device = str(select_device(device))
    pid = os.getpid()
    stat = resolved.stat()
    key = (str(resolved.resolve()), stat.st_mtime_ns, stat.st_size, device, pid)
    if key not in _MODEL_CACHE:
        for stale in [k for k in _MODEL_CACHE if k[4] != pid]:  # inherited from a parent
            del _MODEL_CACHE[stale]
        _MODEL_CACHE[key] = Harmonizer.load(resolved, device=device)
    return _MODEL_CACHE[key]
