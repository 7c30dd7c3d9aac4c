"""The one device resolver of the package (harmonizer, insertion, stages and pipeline use it)."""

from __future__ import annotations

import torch

from singan_insert.errors import SinganInsertError


def select_device(device: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """Resolve a device name: ``None``/``"auto"`` = CUDA when available, else the CPU.

    With ``local_rank`` (torchrun), a bare ``"cuda"`` becomes ``cuda:<local_rank>`` so that each
    process uses its own GPU. The one device resolver of the package (the stages use it too).
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise SinganInsertError(f"Unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:n]'.") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SinganInsertError("CUDA was requested but is not available; use --device cpu.")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    return device
