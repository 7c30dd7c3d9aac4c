"""Reading and writing files: atomic writes, NIfTI volumes, 2D images.

Writes
    Every file the package writes goes through :func:`atomic_write_bytes`: the bytes go to a
    temporary file ``.<name>.<pid>-<random>.tmp`` in the same folder, are flushed to disk
    (``fsync``), and the temporary file is renamed over the destination (``os.replace``). A
    run killed mid-write therefore never leaves a truncated file that a resumed run would
    trust: the destination is either the previous file or the complete new one. The file is
    created with mode ``0o666`` filtered by the process umask, like any ``open(..., "w")``
    (``tempfile.mkstemp`` would make it ``0o600``, unreadable by colleagues). Temporary files
    of writers that died (their process id no longer exists, or the file is older than a day)
    are removed by the next write of this process to that folder; only names of this exact
    pattern are touched. A full disk raises a :class:`~singan_insert.errors.SinganInsertError`
    saying that the previous file was kept. :class:`StagedFiles` does the same for files that
    belong together (an output's image, label and record): none is replaced before all are
    written.

Reads
    :func:`read_nifti` is the one NIfTI reader of the package and :func:`read_2d` the one 2D
    reader (PNG/JPEG/TIFF, NPY, NIfTI). Both load the data at once, so a truncated file, a
    complex or colour image, NaN values or a broken affine are reported when the file is read,
    with its path and what to do, instead of failing later or giving a wrong result.
"""

from __future__ import annotations

import errno
import io as _stdio
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from singan_insert.checks import check_finite
from singan_insert.errors import SinganInsertError

_TMP_SUFFIX = ".tmp"
# ".<name>.<pid>-<token>.tmp": the pid tells a dead writer's leftovers from a live writer's
# file. ".<name>.<8 chars>.tmp" is what tempfile.mkstemp made before version 0.2.
_TMP_PATTERN = re.compile(r"^\..+\.(?:(?P<pid>\d+)-[0-9a-f]{12}|[a-z0-9_]{8})\.tmp$")
_STALE_AFTER_S = 24 * 3600
_FULL_DISK = {errno.ENOSPC, errno.EDQUOT}
_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}
_swept_folders: set[Path] = set()


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically, durably and with umask-honouring permissions.

    Args:
        path: destination file; its folder is created when missing.
        data: the complete file content.

    Returns:
        The destination path.

    Raises:
        SinganInsertError: the disk (or quota) is full, or the folder is not writable; the
            previous file at ``path``, if any, is unchanged and no temporary file is left.
    """
    path = Path(path)
    tmp = _write_temporary(path, data)
    _replace(tmp, path)
    _fsync_folder(path.parent)
    return path


class StagedFiles:
    """Several files that belong together, each written in full before any of them is put in place.

    :meth:`write_bytes` writes a fsynced temporary file beside each destination (the
    :func:`atomic_write_bytes` pattern) and touches no destination; :meth:`commit` then removes
    the paths it is given and renames the temporary files over their destinations in the order
    they were staged. So a failure while the files are written (full disk, an exception, Ctrl-C)
    leaves every previous file as it was, and the renames, the only step left, take microseconds.
    Used as a context manager, whatever was not committed is discarded on exit.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def write_bytes(self, path: str | os.PathLike, data: bytes | bytearray | memoryview) -> int:
        """Stage ``data`` for ``path``; returns the file's modification time (ns), which the
        rename into place keeps (see :func:`file_unchanged`)."""
        path = Path(path)
        tmp = _write_temporary(path, data)
        self._staged.append((tmp, path))
        return tmp.stat().st_mtime_ns

    def commit(self, remove_first: tuple[Path, ...] | list[Path] = ()) -> None:
        """Delete ``remove_first`` (e.g. a record that vouched for the files being replaced),
        then put every staged file in place, in order."""
        for path in remove_first:
            Path(path).unlink(missing_ok=True)
        staged, self._staged = self._staged, []
        for index, (tmp, path) in enumerate(staged):
            try:
                _replace(tmp, path)
            except BaseException:
                for later, _ in staged[index + 1:]:
                    later.unlink(missing_ok=True)
                raise
        for folder in {path.parent for _, path in staged}:
            _fsync_folder(folder)

    def discard(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()


def _write_temporary(path: Path, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to a fsynced temporary file beside ``path``; return its path.

    On failure nothing is left behind and a full disk or an unwritable folder is said plainly.
    """
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _write_error(path, error) from error
    _sweep_stale_temporaries(folder)
    tmp = folder / f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}{_TMP_SUFFIX}"
    try:
        # os.open with mode 0o666 lets the kernel apply the umask (mkstemp forces 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            view = memoryview(data).cast("B")
            while view:
                written = os.write(fd, view[: 1 << 24])
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as error:
        _discard_temporary(tmp, path, error)
    return tmp


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException as error:
        _discard_temporary(tmp, path, error)


def _discard_temporary(tmp: Path, path: Path, error: BaseException):
    """Remove ``tmp`` and re-raise ``error`` (a full disk or refusal as a clear error)."""
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    if isinstance(error, OSError) and error.errno in _FULL_DISK | _REFUSED:
        raise _write_error(path, error) from error
    raise error


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_unchanged(path: str | os.PathLike, entry: dict) -> bool:
    """Whether ``path`` holds the file ``entry`` (``size``, ``sha256``, optional ``mtime_ns``)
    describes: the same size and modification time are taken as proof without reading it (a
    resume checks every finished output); otherwise the SHA-256 decides (e.g. after a copy)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return False
    if stat.st_size != entry.get("size"):
        return False
    return stat.st_mtime_ns == entry.get("mtime_ns") or file_digest(path) == entry.get("sha256")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    """:func:`atomic_write_bytes` of ``value`` as JSON (NaN and infinity refused: not JSON)."""
    return atomic_write_text(path, json.dumps(value, indent=indent, allow_nan=False, default=str))


def atomic_write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an 8-bit (or 16-bit) grayscale or RGB image as PNG, atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype not in (np.uint8, np.uint16):
        raise SinganInsertError(f"A PNG holds uint8 or uint16 pixels, got {image.dtype}; rescale first.")
    buffer = _stdio.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getbuffer())


def write_nifti(path: str | os.PathLike, data, affine, compresslevel: int = 1, header=None) -> Path:
    """Write a NIfTI volume atomically (creating its folder; gzip for ``.gz``); returns the path.

    ``compresslevel`` (0-9) is gzip's for a ``.gz`` name. Level 0 still writes a valid gzip
    stream (stored blocks): worth it for noisy float images, which level 1 shrinks by only ~10 %
    at ~0.2 s per 10 MB (benchmarks/bench_batch.py); label maps shrink ~200x and stay at 1.
    ``header``: see :func:`nifti_bytes`.
    """
    return atomic_write_bytes(path, nifti_bytes(path, data, affine, compresslevel, header))


def nifti_bytes(path: str | os.PathLike, data, affine, compresslevel: int = 1, header=None) -> bytes:
    """The bytes :func:`write_nifti` writes to ``path`` (gzip for a ``.gz`` name).

    ``header``: the header of the volume the data was made from (e.g. an output's target): its
    fields (qform/sform codes, units, description, intent...) are kept, so the output is
    described as its input was; only the data type follows ``data``, and the display range
    (cal_min/cal_max), which described the input's values, is cleared. Without a header,
    nibabel's defaults (sform code 2, no units).
    """
    import gzip

    import nibabel as nib

    from singan_insert.checks import check_int

    compresslevel = check_int(compresslevel, "compresslevel", 0, 9)
    data = np.asarray(data)
    image = nib.Nifti1Image(data, np.asarray(affine, float), header)
    if header is not None:
        image.set_data_dtype(data.dtype)
        image.header["cal_min"] = image.header["cal_max"] = 0
    payload = image.to_bytes()
    if Path(path).name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=compresslevel, mtime=0)
    return payload


def _write_error(path: Path, error: OSError) -> SinganInsertError:
    kept = ("the previous file was kept unchanged" if path.exists()
            else "nothing was written there")
    if error.errno in _FULL_DISK:
        what = "the disk (or your quota) is full"
        advice = "Free some space (or choose another --out) and re-run the same command to resume."
    else:
        what = f"the folder is not writable ({error.strerror})"
        advice = "Choose a folder you can write to, or fix its permissions."
    return SinganInsertError(f"Could not write {str(path)!r}: {what}; {kept}. {advice}")


def _sweep_stale_temporaries(folder: Path) -> None:
    """Remove this pattern's temporary files left by dead writers (once per folder and process)."""
    key = folder.resolve()
    if key in _swept_folders:
        return
    _swept_folders.add(key)
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TMP_PATTERN.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > _STALE_AFTER_S
            pid = match.group("pid")
            dead = pid is None or not _process_alive(int(pid))
            # A file of the old mkstemp pattern has no pid: only its age tells it is stale.
            if old or (pid is not None and dead):
                os.unlink(entry.path)
        except OSError:
            continue  # another process removed it or it is not ours to remove


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot tell: keep the file
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (a crash right after it could otherwise undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- reading
def _check_input_file(path: Path, what: str) -> None:
    if not path.exists():
        raise SinganInsertError(f"The {what} file {str(path)!r} does not exist.")
    if path.is_dir():
        raise SinganInsertError(f"The {what} {str(path)!r} is a folder; pass a file.")


def read_nifti(path: str | os.PathLike, *, what: str = "image", ndim: int | None = 3):
    """Read a NIfTI volume, fully, with clear errors for everything that would go wrong later.

    Trailing axes of length 1 beyond the third are dropped (``(X, Y, Z, 1)`` is a 3D volume).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        what: what the file is, for messages (``"image"``, ``"label"``, ``"training volume"``).
        ndim: the number of axes required (3), or ``None`` to accept 1 to 3 axes.

    Returns:
        An in-memory ``nibabel`` image (data loaded, scaling applied) with the file's header
        and affine, so ``np.asarray(image.dataobj)`` costs nothing more.

    Raises:
        SinganInsertError: the file is missing, a folder, truncated or not NIfTI; holds colour
            (RGB), complex or 4D data; its affine or voxel sizes (pixdim) are zero, NaN or
            infinite; or its data holds NaN or infinity.
    """
    import nibabel as nib

    path = Path(path)
    _check_input_file(path, what)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except MemoryError:
        raise
    except Exception as error:  # nibabel, gzip and zlib raise a dozen types for broken files
        raise SinganInsertError(
            f"Could not read the {what} {str(path)!r} as NIfTI ({type(error).__name__}: {error}). "
            "The file is truncated, damaged or not a NIfTI file: copy or export it again."
        ) from error
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        kind = "colour (RGB/RGBA)" if data.dtype.fields is not None else str(data.dtype)
        advice = ("take the magnitude (numpy.abs) and save a real-valued volume" if data.dtype.kind == "c"
                  else "convert it to a single-channel (grayscale) volume")
        raise SinganInsertError(f"The {what} {str(path)!r} holds {kind} data; {advice}.")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    wanted = "3" if ndim == 3 else "1 to 3"
    if (ndim is not None and data.ndim != ndim) or data.ndim > 3 or data.ndim == 0:
        raise SinganInsertError(
            f"The {what} {str(path)!r} has shape {data.shape}; {wanted} axes are expected. For a 4D "
            "series, save one volume (e.g. nibabel: image.slicer[..., 0]).")
    zooms = np.asarray(_stored_zooms(path, image)[: min(data.ndim, 3)], dtype=float)
    affine = np.asarray(image.affine, dtype=float)
    if not (np.all(np.isfinite(zooms)) and np.all(zooms > 0)):
        raise SinganInsertError(
            f"The {what} {str(path)!r} has voxel sizes (pixdim) {zooms.tolist()}: they must be "
            "finite and positive. The header is broken; fix it (nibabel: header.set_zooms) — "
            "singan-insert does not invent a spacing.")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SinganInsertError(
            f"The {what} {str(path)!r} has an affine that is not finite or not invertible "
            f"({affine[:3, :3].tolist()}). Fix its sform/qform before using it.")
    if data.dtype.kind == "f":
        check_finite(data, f"{what} {str(path)!r}")
    return type(image)(data, affine, image.header)


def _stored_zooms(path: Path, image) -> tuple[float, ...]:
    """The voxel sizes as stored: nibabel silently replaces a zero pixdim by 1 when it loads."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as handle:
            return type(image.header).from_fileobj(handle, check=False).get_zooms()
    except Exception:  # not a single-file format nibabel can re-read raw: trust the loaded header
        return image.header.get_zooms()


def nifti_spacing(image, axes: tuple[int, ...] | None = None) -> tuple[float, ...]:
    """Voxel sizes in mm of an image from :func:`read_nifti` (all axes, or ``axes``)."""
    zooms = tuple(float(z) for z in image.header.get_zooms()[: image.ndim])
    return zooms if axes is None else tuple(zooms[a] for a in axes)


def orientation_codes(affine: np.ndarray) -> str:
    """The axis codes of a voxel-to-world affine (RAS+ world), e.g. ``"RAS"`` or ``"LPS"``."""
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(np.asarray(affine, dtype=np.float64)))


def read_2d(path: str | os.PathLike, what: str = "slice") -> np.ndarray:
    """Read one 2D slice as ``float32``: PNG/JPEG/TIFF (grayscale), NPY, or a 2D / one-slice NIfTI.

    A colour picture whose three channels are equal (a grayscale image saved as RGB) is read as
    grayscale; real colour is refused rather than averaged. A fully opaque alpha channel is
    dropped.

    Raises:
        SinganInsertError: missing file, a folder, an unreadable or truncated file, colour,
            complex, object or non-2D data, or NaN / infinite values.
    """
    path = Path(path)
    _check_input_file(path, what)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        data = np.asanyarray(read_nifti(path, what=what, ndim=None).dataobj)
        data = data.squeeze() if data.ndim == 3 else data
    else:
        try:
            if name.endswith(".npy"):
                data = np.load(path, allow_pickle=False)
            else:
                from skimage.io import imread

                data = imread(str(path))
        except MemoryError:
            raise
        except Exception as error:  # PIL, imageio and numpy raise many types for broken files
            raise SinganInsertError(
                f"Could not read the {what} {str(path)!r} ({type(error).__name__}: {error}). The file is "
                "truncated, damaged or not an image: export it again (PNG, NPY or NIfTI)."
            ) from error
        data = np.asarray(data)
        if data.dtype.kind not in "biuf":
            raise SinganInsertError(
                f"The {what} {str(path)!r} holds {data.dtype} data; save a real-valued 2D array "
                "(for complex data, numpy.abs).")
        if data.ndim == 3 and data.shape[-1] in (2, 3, 4) and not name.endswith(".npy"):
            data = _grayscale(data, path, what)
    if data.ndim != 2:
        raise SinganInsertError(f"The {what} {str(path)!r} has shape {data.shape}; a 2D slice is expected.")
    data = data.astype(np.float32)
    check_finite(data, f"{what} {str(path)!r}")
    return data


def _grayscale(data: np.ndarray, path: Path, what: str) -> np.ndarray:
    channels = data.shape[-1]
    if channels in (2, 4):
        alpha = data[..., -1]
        if alpha.min() != alpha.max():
            raise SinganInsertError(
                f"The {what} {str(path)!r} has a transparency channel that is not uniform; save it "
                "without transparency.")
        data = data[..., :-1]
    if data.shape[-1] == 3:
        if not (np.array_equal(data[..., 0], data[..., 1]) and np.array_equal(data[..., 0], data[..., 2])):
            raise SinganInsertError(
                f"The {what} {str(path)!r} is a colour image; save it as grayscale (one channel) first.")
    return data[..., 0]
