"""The one device resolver of the package (harmonizer, insertion, stages and pipeline use it)."""

from __future__ import annotations

from typing import Any

import torch

from singan_insert.errors import SinganInsertError


def select_device(device: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """Resolve a device name: ``None``/``"auto"`` = CUDA when available, else the CPU.

    With ``local_rank`` (torchrun), a bare ``"cuda"`` becomes ``cuda:<local_rank>`` so that each
    process uses its own GPU. The one device resolver of the package (the stages use it too).
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = _parse(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SinganInsertError("CUDA was requested but is not available; use --device cpu.")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    return device


def check_device(device: Any) -> str:
    """``device``'s name, checked but not resolved (``"auto"`` stays ``"auto"``).

    For a setting that is given in one place and used in another (a transform built in the main
    process runs in data-loader workers): a typo fails when it is given, while whether CUDA is
    there is left to :func:`select_device` where the device is used.
    """
    if not isinstance(device, (str, torch.device)):
        raise SinganInsertError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}.")
    device = str(device)
    if device != "auto":
        _parse(device)
    return device


def _parse(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise SinganInsertError(f"Unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:n]'.") from error
