"""The on-disk format of models and checkpoints: tensors in safetensors, metadata in JSON, a digest.

A file written here is a plain `safetensors <https://huggingface.co/docs/safetensors>`_
file. Its header metadata holds two keys: ``"singan_insert"``, whose value is a JSON document::

    {"format": "<kind>", "format_version": 2, "package_version": "0.1.0", ...}

and ``"singan_insert_sha256"``, the SHA-256 digest of that JSON text and of every tensor (its
name, dtype, shape and bytes, in name order)::

    sha256( "singan-insert-model-file\n" + json_text + "\n"
            + for name in sorted(tensors): "[name, dtype, shape]\n" + raw little-endian bytes )

``kind`` tells a harmonizer model (``"singan-insert-harmonizer"``) from a training checkpoint
(``"singan-insert-checkpoint"``) or a stage model (``"singan-insert-cyclegan"``, ...).

Loading (:func:`load_tensors`) never unpickles anything and trusts nothing in the file:

1. the safetensors header is parsed here (not by the safetensors library): its length, every
   tensor's dtype, shape and byte range are checked against each other and against the file
   size, so no shape can ask for more memory than the file holds;
2. the kind, the format version and the kind's metadata (for a harmonizer: geometry, widths,
   layer count, noise amplitudes, normalisation, spacing) are checked field by field — types,
   counts, ranges — and the tensor shapes they imply are compared with the header (networks
   are built on PyTorch's ``meta`` device, which allocates nothing), all before a single
   tensor byte is read, so a crafted file cannot make the loader build huge networks;
3. the digest is recomputed and compared: any change of a byte of the header or of the
   tensors (a bit flip on disk, a truncated copy) is a :class:`~singan_insert.errors.ModelFileError`
   saying the file is corrupt (when step 2 fails on a file with a digest, the digest decides
   whether the message says "corrupt" or "not valid");
4. tensors holding NaN or infinity are refused (they would turn every output pixel into NaN).

Files of format version 1 (singan-insert 0.1, no digest) still load after the checks of steps
1, 2 and 4, with one :class:`UnverifiedModelFileWarning` per load: re-save them
(``Harmonizer.load(old).save(new)``) to add a digest. A version-2 file without a digest, or any
file whose digest does not match, is refused. Writes are atomic (see
:func:`singan_insert.io.atomic_write_bytes`), so an interrupted write leaves the previous file
intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from singan_insert._version import __version__
from singan_insert.errors import ModelFileError, SinganInsertError
from singan_insert.io import atomic_write_bytes

FORMAT_VERSION = 2
#: Tensors first written by format version 2 (2026-12-01): never in a version-1 file.
_TENSORS_AFTER_VERSION_1 = frozenset({"training_slice", "tumor_annotation"})
#: Format versions this package reads (1: no digest, loaded with a warning).
READABLE_VERSIONS = (1, 2)
_METADATA_KEY = "singan_insert"
_DIGEST_KEY = "singan_insert_sha256"
_DIGEST_PREFIX = b"singan-insert-model-file\n"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_TENSORS = 100_000
_MAX_NDIM = 8
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _advice(kind: str) -> str:
    """What to do with a damaged file; re-running on a damaged checkpoint would only loop."""
    if kind.endswith("checkpoint"):
        return ("delete it and re-run: training then starts over (a checkpoint cannot be "
                "repaired, and resuming from it would fail again)")
    return "re-train it, or copy it again from a good source"


class UnverifiedModelFileWarning(UserWarning):
    """A format-version-1 model file was loaded: it has no digest, so corruption is undetectable."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file, as its header declares it (validated against the file size)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ModelFileHeader:
    """The validated header of a model file: what :func:`load_tensors` will read.

    Attributes:
        path: the file.
        meta: the ``"singan_insert"`` JSON document.
        meta_text: the same document as stored (the digest covers this text).
        tensors: name -> :class:`TensorEntry`, byte ranges relative to ``data_start``.
        digest: the stored SHA-256 hex digest, or ``None`` for a format-version-1 file.
        data_start: offset of the first tensor byte in the file.
        data_size: number of tensor bytes.
        advice: what to do when the file turns out damaged (for messages).
    """

    path: Path
    meta: dict[str, Any]
    meta_text: str
    tensors: dict[str, TensorEntry]
    digest: str | None
    data_start: int
    data_size: int
    advice: str = _advice("")


MetadataCheck = Callable[[dict[str, Any], ModelFileHeader], None]
_METADATA_CHECKS: dict[str, MetadataCheck] = {}


def save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    kind: str,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``tensors`` and JSON-serialisable ``metadata`` atomically as a safetensors file with a digest.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        tensors: name -> tensor; tensors are moved to the CPU and made contiguous. Floating
            tensors must be finite.
        kind: the file kind written into the header, e.g. ``"singan-insert-harmonizer"``.
        metadata: any JSON-serialisable dictionary stored beside the tensors (its ``format``,
            ``format_version`` and ``package_version`` keys are set by this function).

    Raises:
        ModelFileError: a tensor holds NaN or infinity (training diverged), or has a dtype
            the format does not store.
        SinganInsertError: the disk is full or the folder not writable (the previous file is kept).
    """
    from safetensors.torch import save

    header = {
        **(metadata or {}),
        "format": kind,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
    }
    cpu_tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    for name, tensor in cpu_tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ModelFileError(f"Tensor {name!r} has dtype {tensor.dtype}, which model files do not store.")
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise ModelFileError(
                f"Refusing to save {str(path)!r}: tensor {name!r} holds NaN or infinite values "
                "(training diverged?). Lower the learning rate or re-train from another seed.")
    text = json.dumps(header)
    # What load_tensors would refuse is not written: a saved file always loads again.
    entries, offset = {}, 0
    for name, tensor in cpu_tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = TensorEntry(_DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), offset, offset + nbytes)
        offset += nbytes
    planned = ModelFileHeader(Path(path), json.loads(text), text, entries, None, 0, offset)
    _run_checks(kind, None, planned, f"Refusing to write {str(path)!r}: its metadata is not a valid {kind}",
                "This is a bug in the code that saves it; please report it.")
    digest = _digest(text, ((name, _DTYPE_NAMES[t.dtype], tuple(t.shape), _raw_bytes(t))
                            for name, t in cpu_tensors.items()))
    atomic_write_bytes(path, save(cpu_tensors, metadata={_METADATA_KEY: text, _DIGEST_KEY: digest}))
    return Path(path)


def load_tensors(
    path: str | os.PathLike,
    kind: str,
    device: str | torch.device = "cpu",
    *,
    check: MetadataCheck | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`, verifying it completely first.

    Args:
        path: the file.
        kind: the expected ``format`` (file kind).
        device: where the tensors go.
        check: an extra check of the metadata against the header, run before any tensor
            byte is read, ``check(meta, header)``; it raises :class:`ModelFileError` (or any
            ``ValueError``) for a bad file. The kinds registered with
            :func:`register_metadata_check` (harmonizer, checkpoint) run theirs as well.

    Raises:
        ModelFileError: the file is missing, not a safetensors file (for example a pickle),
            truncated or corrupt (digest mismatch), written by another program, of another
            kind or format version, inconsistent with its own metadata, or holds NaN/inf.
    """
    header = _parse_header(Path(path), kind)
    path, redo = header.path, header.advice
    corrupt = ModelFileError(
        f"{str(path)!r} is corrupt: its content does not match the digest stored when it was "
        f"written (a changed byte in the header or in the tensors). Do not use it: {redo}.")
    try:
        # Kind, version and every metadata field, from the header alone: nothing is read or
        # built before they pass.
        _check_identity(header, kind)
        _run_checks(kind, check, header, f"{str(path)!r} is not a valid {kind} file",
                    f"It was damaged or not written by singan-insert: {redo}.")
    except ModelFileError as error:
        # Damage must be reported as damage, not as a puzzling field: consult the digest.
        version = header.meta["format_version"]
        if header.digest is not None and version <= FORMAT_VERSION and not _digest_matches(header, _read(header)):
            raise corrupt from error
        raise
    buffers = _read(header)
    if header.digest is not None and not _digest_matches(header, buffers):
        raise corrupt
    if header.digest is None:
        warnings.warn(
            f"{str(path)!r} has format version 1 (no digest): it loads, but corruption cannot be "
            "detected. Load it and save it again with this version to add one.",
            UnverifiedModelFileWarning, stacklevel=2)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(header.tensors):
        tensor = _tensor_from(buffers.pop(name), header.tensors[name])
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise ModelFileError(
                f"{str(path)!r}: tensor {name!r} holds NaN or infinite values, so the model would "
                f"output NaN. Do not use it: {redo}.")
        tensors[name] = tensor.to(device)
    return tensors, header.meta


def read_header(path: str | os.PathLike, kind: str) -> ModelFileHeader:
    """Parse and validate a model file's header without reading its tensors (nor the digest).

    Checks the safetensors layout (length, JSON, dtypes, shapes, contiguous byte ranges that
    cover the file exactly), the ``singan_insert`` metadata, its kind and format version.

    Raises:
        ModelFileError: see :func:`load_tensors`.
    """
    header = _parse_header(Path(path), kind)
    _check_identity(header, kind)
    return header


def register_metadata_check(kind: str, check: MetadataCheck) -> None:
    """Make :func:`load_tensors` run ``check(meta, header)`` for every file of ``kind``."""
    _METADATA_CHECKS[kind] = check


def check_module_tensors(header: ModelFileHeader, prefix: str, build: Callable[[], torch.nn.Module]) -> None:
    """Check that the file holds exactly the tensors (names, shapes, dtypes) of ``build()`` under ``prefix``.

    ``build`` runs on PyTorch's ``meta`` device, so even a module declared with absurd sizes
    allocates nothing; call this from a metadata check, before the real module is built.

    Raises:
        ModelFileError: a tensor is missing, extra, or of another shape or dtype.
    """
    with torch.device("meta"):
        expected = {f"{prefix}.{name}": (_DTYPE_NAMES.get(t.dtype), tuple(t.shape))
                    for name, t in build().state_dict().items()}
    present = {name: (e.dtype, e.shape) for name, e in header.tensors.items() if name.startswith(prefix + ".")}
    if present != expected:
        missing = sorted(set(expected) - set(present))[:3]
        extra = sorted(set(present) - set(expected))[:3]
        wrong = sorted(n for n in set(expected) & set(present) if expected[n] != present[n])[:3]
        raise ModelFileError(
            f"{str(header.path)!r} does not hold the network its metadata describes under {prefix!r} "
            f"(missing {missing}, unexpected {extra}, other shape or dtype {wrong}): {header.advice}.")


# ------------------------------------------------------------------------------ internals
def _parse_header(path: Path, kind: str) -> ModelFileHeader:
    """The safetensors layout and the metadata JSON, checked against each other and the file size."""
    if not path.exists():
        raise ModelFileError(f"Model file {str(path)!r} does not exist.")
    if path.is_dir():
        raise ModelFileError(f"{str(path)!r} is a folder, not a model file.")
    redo = _advice(kind)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        if len(head) < 9:
            raise ModelFileError(f"{str(path)!r} is empty or truncated ({size} bytes): {redo}.")
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] != b"{" or header_len > _MAX_HEADER_BYTES:
            pickle_like = head[:1] == b"\x80" or head[:2] == b"PK"
            hint = " It looks like a pickle (torch.save) file;" if pickle_like else ""
            raise ModelFileError(
                f"{str(path)!r} is not a safetensors file (or its first bytes are damaged).{hint} "
                "singan-insert never unpickles files; convert or re-train the model with this package.")
        if 8 + header_len > size:
            raise ModelFileError(
                f"{str(path)!r} is truncated (its header says {header_len} bytes, the file has {size}): {redo}.")
        raw = head[8:] + handle.read(header_len - 1)

    def corrupt(detail: str) -> ModelFileError:
        return ModelFileError(f"{str(path)!r} is corrupt or truncated ({detail}): {redo}.")

    try:
        table = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise corrupt(f"unreadable safetensors header: {error}") from error
    if not isinstance(table, dict):
        raise corrupt("the safetensors header is not a JSON object")
    raw_meta = table.pop("__metadata__", None)
    if not isinstance(raw_meta, dict) or not isinstance(raw_meta.get(_METADATA_KEY), str):
        raise ModelFileError(
            f"{str(path)!r} is a safetensors file, but not one written by singan-insert (its header "
            "has no 'singan_insert' metadata), or its header is damaged. Train a model with "
            "`singan-insert train` or pass a file this package wrote.")
    digest = raw_meta.get(_DIGEST_KEY)
    unknown = sorted(set(raw_meta) - {_METADATA_KEY, _DIGEST_KEY})
    if unknown:
        raise corrupt(f"unexpected header metadata {unknown}")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
        raise corrupt("the stored digest is malformed")
    data_size = size - 8 - header_len
    entries = _tensor_entries(table, data_size, corrupt)
    try:
        meta = json.loads(raw_meta[_METADATA_KEY], object_pairs_hook=_unique_keys)
    except ValueError as error:
        raise corrupt(f"unreadable metadata: {error}") from error
    if not isinstance(meta, dict):
        raise corrupt("the metadata is not a JSON object")
    version = meta.get("format_version")
    if type(version) is not int or version < 1:
        raise corrupt(f"format_version {version!r}")
    return ModelFileHeader(path, meta, raw_meta[_METADATA_KEY], entries, digest, 8 + header_len, data_size, redo)


def _run_checks(kind: str, check: MetadataCheck | None, header: ModelFileHeader, what: str, advice: str) -> None:
    """The kind's registered check and the caller's, any failure as one ModelFileError."""
    for run_check in filter(None, (_METADATA_CHECKS.get(kind), check)):
        try:
            run_check(header.meta, header)
        except (KeyError, TypeError, ValueError) as error:  # ModelFileError is a ValueError too
            if isinstance(error, ModelFileError) and not what.startswith("Refusing"):
                raise
            raise ModelFileError(f"{what} ({type(error).__name__}: {error}). {advice}") from error


def _check_identity(header: ModelFileHeader, kind: str) -> None:
    """The format version and the kind (after the digest, when there is one, was verified)."""
    path, meta = header.path, header.meta
    version = meta["format_version"]
    if version > FORMAT_VERSION and meta.get("package_version") == __version__:
        # This very version never writes a newer format: the version number was damaged.
        raise ModelFileError(f"{str(path)!r} is corrupt (format version {version} from singan-insert "
                             f"{__version__}, which writes {FORMAT_VERSION}): {header.advice}.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{str(path)!r} has format version {version}; this singan-insert ({__version__}) reads "
            f"versions {list(READABLE_VERSIONS)}. Use the singan-insert version that wrote it "
            f"(package_version={meta.get('package_version')!r}) or re-train. (If no newer "
            "singan-insert wrote it, the file is damaged.)")
    if header.digest is None and version != 1:
        # Version 1 is the only one without a digest: a later file lost it to damage.
        raise ModelFileError(f"{str(path)!r} is corrupt (format version {version} without its digest): {header.advice}.")
    later = sorted(_TENSORS_AFTER_VERSION_1 & set(header.tensors)) if version == 1 else []
    if later:
        # A version-1 file cannot hold what only version 2 writes: such a file had its version
        # (and digest) edited, which would otherwise pass it off as an unverifiable old file.
        raise ModelFileError(
            f"{str(path)!r} is corrupt or was edited: it says format version 1, which has no digest, but holds "
            f"{', '.join(later)}, which only version 2 files (with a digest) hold. {header.advice}.")
    if meta.get("format") != kind:
        raise ModelFileError(f"{str(path)!r} holds a {meta.get('format')!r}, but a {kind!r} was expected.")


def _tensor_entries(table: dict[str, Any], data_size: int, corrupt) -> dict[str, TensorEntry]:
    if len(table) > _MAX_TENSORS:
        raise corrupt(f"{len(table)} tensors declared")
    entries: dict[str, TensorEntry] = {}
    for name, spec in table.items():
        if not (isinstance(spec, dict) and set(spec) == {"dtype", "shape", "data_offsets"}):
            raise corrupt(f"tensor entry {name!r} is malformed")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in _DTYPES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
                and all(type(d) is int and d >= 0 for d in shape)):
            raise corrupt(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise corrupt(f"tensor {name!r} has invalid byte offsets {offsets!r}")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if not 0 <= offsets[0] <= offsets[1] <= data_size or offsets[1] - offsets[0] != nbytes:
            raise corrupt(f"tensor {name!r} of shape {shape} needs {nbytes} bytes at {offsets}; "
                          f"the file holds {data_size} tensor bytes")
        entries[name] = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    cursor = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != cursor:
            raise corrupt("overlapping or unaccounted tensor bytes")
        cursor = entry.end
    if cursor != data_size:
        raise corrupt(f"the header accounts for {cursor} tensor bytes, the file holds {data_size}")
    return entries


def _read(header: ModelFileHeader) -> dict[str, bytearray]:
    """The tensors' bytes (at most the file's size), one buffer per tensor: a tensor kept alive
    later, e.g. an optimizer moment, then keeps only its own bytes alive."""
    buffers: dict[str, bytearray] = {}
    with open(header.path, "rb") as handle:
        for name, entry in header.tensors.items():
            buffers[name] = bytearray(entry.end - entry.begin)
            handle.seek(header.data_start + entry.begin)
            if handle.readinto(buffers[name]) != len(buffers[name]):
                raise ModelFileError(
                    f"{str(header.path)!r} is truncated (did it change while being read?): {header.advice}.")
    return buffers


def _digest_matches(header: ModelFileHeader, buffers: dict[str, bytearray]) -> bool:
    entries = header.tensors
    return header.digest == _digest(header.meta_text, (
        (name, entries[name].dtype, entries[name].shape, buffers[name]) for name in entries))


def _tensor_from(buffer: bytearray, entry: TensorEntry) -> torch.Tensor:
    dtype = _DTYPES[entry.dtype]
    if not buffer:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _digest(text: str, items: Iterable[tuple[str, str, tuple[int, ...], Any]]) -> str:
    digest = hashlib.sha256(_DIGEST_PREFIX)
    digest.update(text.encode("utf-8"))
    digest.update(b"\n")
    for name, dtype, shape, data in sorted(items, key=lambda item: item[0]):
        digest.update(json.dumps([name, dtype, list(shape)]).encode("utf-8"))
        digest.update(b"\n")
        digest.update(data)
    return digest.hexdigest()


def _all_finite(tensor: torch.Tensor) -> bool:
    # A finite sum proves every value finite; only a non-finite sum needs the full check
    # (a float16 sum can overflow to inf with every value finite).
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate keys")
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


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


# ------------------------------------------------------- the package's own kinds, field by field
#: Bounds of what a harmonizer file may declare; generous for real models, small enough that
#: nothing declared within them can exhaust memory at load or harmonization time.
MAX_SCALES = 64
MAX_SIZE = 4096
MAX_WIDTH = 4096
MAX_LAYERS = 64


def _field(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in meta:
        raise ValueError(f"{where}{key} is missing")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where}{key} must be a {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _check_normalization(value: Any, where: str) -> None:
    from singan_insert.checks import check_real

    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object")
    low = check_real(_field(value, "low", (int, float), where + "."), f"{where}.low")
    high = check_real(_field(value, "high", (int, float), where + "."), f"{where}.high")
    percentiles = _field(value, "percentiles", list, where + ".")
    if low >= high or len(percentiles) != 2:
        raise ValueError(f"{where} needs low < high and two percentiles")
    p_low, p_high = (check_real(p, f"{where}.percentiles", 0, 100) for p in percentiles)
    if p_low >= p_high:
        raise ValueError(f"{where}.percentiles must increase")


def _check_harmonizer_file(meta: dict[str, Any], header: ModelFileHeader) -> None:
    """Every field :meth:`~singan_insert.harmonizer.model.Harmonizer.load` uses, and the tensors they imply."""
    from singan_insert.checks import check_int, check_real
    from singan_insert.harmonizer.networks import ARCHITECTURES, build_generator

    arch = meta.get("arch", "singan")  # files written before the architecture was recorded
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r} is not one of {ARCHITECTURES}")
    geometry = _field(meta, "geometry", dict)
    sizes = _field(geometry, "sizes", list, "geometry.")
    if not 1 <= len(sizes) <= MAX_SCALES:
        raise ValueError(f"geometry.sizes has {len(sizes)} scales (1..{MAX_SCALES} allowed)")
    for size in sizes:
        if not (isinstance(size, list) and len(size) == 2):
            raise ValueError(f"geometry.sizes holds {size!r}, not [height, width]")
        for side in size:
            check_int(side, "geometry.sizes", 1, MAX_SIZE)
    check_real(_field(geometry, "scale_factor", (int, float), "geometry."), "geometry.scale_factor", 0, 1,
               open_minimum=True)
    num_scales = len(sizes)
    first = check_int(_field(meta, "first_trained_scale", int), "first_trained_scale", 0, num_scales - 1)
    trained = num_scales - first
    widths = _field(meta, "widths", list)
    amplitudes = _field(meta, "noise_amplitudes", list)
    if len(widths) != trained or len(amplitudes) != trained:
        raise ValueError(f"{trained} trained scales, but {len(widths)} widths and {len(amplitudes)} noise amplitudes")
    widths = [check_int(w, "widths", 1, MAX_WIDTH) for w in widths]
    for amplitude in amplitudes:
        check_real(amplitude, "noise_amplitudes", 0)
    num_layers = check_int(_field(meta, "num_layers", int), "num_layers", 2, MAX_LAYERS)
    _check_normalization(_field(meta, "normalization", dict), "normalization")
    spacing = meta.get("spacing")
    if spacing is not None:
        if not (isinstance(spacing, list) and len(spacing) == 2):
            raise ValueError(f"spacing must be null or [row_mm, col_mm], got {spacing!r}")
        for value in spacing:
            check_real(value, "spacing", 0, open_minimum=True)
    for index, width in enumerate(widths):
        check_module_tensors(header, f"generators.{index}",
                             lambda width=width: build_generator(arch, width, num_layers))
    others = {name: entry for name, entry in header.tensors.items()
              if not re.fullmatch(rf"generators\.({'|'.join(map(str, range(trained)))})\..+", name)}
    noise = others.pop("reconstruction_noise", None)
    training_slice = others.pop("training_slice", None)
    annotation = others.pop("tumor_annotation", None)
    if others:
        raise ValueError(f"unexpected tensors {sorted(others)[:3]}")
    if training_slice is not None and (training_slice.dtype, training_slice.shape) != ("F32", tuple(sizes[-1])):
        raise ValueError(f"training_slice is {training_slice.dtype} {list(training_slice.shape)}, expected F32 "
                         f"{list(sizes[-1])} (the finest scale)")
    if annotation is not None and (training_slice is None or (annotation.dtype, annotation.shape)
                                   != ("F32", tuple(sizes[-1]))):
        raise ValueError(f"tumor_annotation is {annotation.dtype} {list(annotation.shape)}, expected F32 "
                         f"{list(sizes[-1])} beside a training_slice")
    if noise is not None and (noise.dtype, noise.shape) != ("F32", (1, 1, *sizes[0])):
        raise ValueError(f"reconstruction_noise is {noise.dtype} {list(noise.shape)}, expected F32 "
                         f"[1, 1, {sizes[0][0]}, {sizes[0][1]}]")


_CHECKPOINT_TENSOR = re.compile(
    r"rng_state|reconstruction_noise|(generators\.\d+|critic|current_generator)\.body\.\d+\.(weight|bias)"
    r"|opt_[gd]\.\d+\.\w+")


def _check_checkpoint_file(meta: dict[str, Any], header: ModelFileHeader) -> None:
    """The fields a resumed training run reads, and the tensors that must come with them."""
    from singan_insert.checks import check_int, check_real, check_seed
    from singan_insert.harmonizer.networks import PatchCritic

    _field(meta, "fingerprint", str)
    check_seed(_field(meta, "seed", int), "seed")
    check_int(_field(meta, "scale", int), "scale", 0, MAX_SCALES)
    iteration = check_int(_field(meta, "iteration", int), "iteration", 0)
    amplitudes = _field(meta, "amplitudes", list)
    if len(amplitudes) > MAX_SCALES:
        raise ValueError(f"{len(amplitudes)} amplitudes (at most {MAX_SCALES})")
    for amplitude in amplitudes:
        check_real(amplitude, "amplitudes", 0)
    _field(meta, "log", list)
    _check_normalization(_field(meta, "normalization", dict), "normalization")
    names = header.tensors
    strange = sorted(name for name in names if not _CHECKPOINT_TENSOR.fullmatch(name))
    if strange:
        raise ValueError(f"unexpected tensors {strange[:3]}")
    rng = names.get("rng_state")
    if rng is None or rng.dtype != "U8" or len(rng.shape) != 1 or rng.shape[0] > 1 << 16:
        raise ValueError("rng_state is missing or not a byte vector")
    stored = {int(name.split(".")[1]) for name in names if name.startswith("generators.")}
    if stored != set(range(len(amplitudes))):
        raise ValueError(f"{len(amplitudes)} amplitudes but generators {sorted(stored)[:5]}")
    for name, entry in names.items():
        if name.endswith("body.0.weight") and entry.shape[:1] and entry.shape[0] > MAX_WIDTH:
            raise ValueError(f"{name} is {entry.shape[0]} filters wide (at most {MAX_WIDTH})")
    if "critic_width" in meta:
        width = check_int(meta["critic_width"], "critic_width", 1, MAX_WIDTH)
        layers = sum(1 for name in names if re.fullmatch(r"critic\.body\.\d+\.weight", name))
        layers = check_int(layers, "critic layers", 2, MAX_LAYERS)
        check_module_tensors(header, "critic", lambda: PatchCritic(width=width, num_layers=layers))
    if iteration > 0:
        optimizers = _field(meta, "optimizers", dict)
        for role in ("generator", "critic"):
            part = _field(optimizers, role, dict, "optimizers.")
            _field(part, "param_groups", list, f"optimizers.{role}.")
            _field(part, "scalars", dict, f"optimizers.{role}.")


# The kind names are the ones Harmonizer (model.py) and training (training.py) write.
register_metadata_check("singan-insert-harmonizer", _check_harmonizer_file)
register_metadata_check("singan-insert-checkpoint", _check_checkpoint_file)
