"""Reading and writing files: atomic writes, NIfTI volumes.

Every file the package writes goes through :func:`atomic_write_bytes` (a temporary file in the
same folder, then ``os.replace``), so an interrupted run never leaves a truncated file that a
resumed run would trust.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_nifti(path: str | os.PathLike, data, affine) -> Path:
    """Write a NIfTI volume atomically (creating its folder; gzip for ``.gz``); returns the path.

    Atomic (temporary file + rename), so a run killed mid-write leaves no truncated volume for
    a resumed run to trust.
    """
    import gzip

    import nibabel as nib
    import numpy as np

    path = Path(path)
    payload = nib.Nifti1Image(np.asarray(data), np.asarray(affine, float)).to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
    atomic_write_bytes(path, payload)
    return path
