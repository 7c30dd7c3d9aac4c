"""Stamps: what made each output of the pipeline, so that a re-run redoes exactly what is stale.

An output (a resampled volume, a model, one B', one prediction) is kept on a re-run only when

* its files exist and are the ones written with it (same size and modification time, or the
  same SHA-256 when only the time changed, e.g. after a copy), and
* its stamp, ``<work>/stamps/<key>.json``, holds the same *parts* as now: the settings that
  decide it, the state of its input files (path, size, modification time) and the *token* of
  every upstream output it was made from.

A token is a SHA-256 of an output's bytes (taken from its stamp while the files are unchanged),
so a retrained model, a redone volume or a replaced input changes every stamp downstream of it
and the whole chain below is redone; an upstream output redone bit-identically changes nothing.
Files inside the work folder are named relative to it, so a stamp does not depend on the
current folder, and a copied work folder stays valid.

Training that resumes from a checkpoint first records a *pending* stamp: a checkpoint is resumed
only under a pending stamp with the same parts, so a checkpoint of other data or settings is
deleted and the model trained from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from singan_insert.errors import SinganInsertError
from singan_insert.io import atomic_write_json

__all__ = ["STAMP_DIR", "Stamps", "fingerprint"]

STAMP_DIR = "stamps"
_VERSION = 1


def fingerprint(value: Any) -> str:
    """SHA-256 of a JSON-able value (keys sorted, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    from singan_insert.io import file_digest

    try:
        return file_digest(path)
    except FileNotFoundError:
        raise SinganInsertError(f"{path} does not exist: run the step that writes it first.") from None


class Stamps:
    """The stamps of one work folder (see the module docstring)."""

    def __init__(self, work: str | os.PathLike):
        self.work = Path(work).resolve()
        self.folder = self.work / STAMP_DIR

    # -- names ----------------------------------------------------------------------------
    def name(self, path: str | os.PathLike) -> str:
        """``path`` relative to the work folder when inside it, else absolute."""
        # Resolved like the work folder: reached through a symbolic link (macOS's /tmp), an
        # output inside it would otherwise not be seen as inside, and its stamp key would be
        # an absolute path that lands beside the output, not under stamps/.
        resolved = Path(path).resolve()
        try:
            return resolved.relative_to(self.work).as_posix()
        except ValueError:
            return str(resolved)

    def resolve(self, name: str) -> Path:
        """A path written by :meth:`name`, resolved against the work folder (never the cwd)."""
        return self.work / name

    def _path(self, key: str, pending: bool = False) -> Path:
        return self.folder / f"{key}{'.pending' if pending else ''}.json"

    def _read(self, key: str, pending: bool = False) -> dict | None:
        try:
            stamp = json.loads(self._path(key, pending).read_text())
        except (OSError, ValueError):
            return None
        return stamp if isinstance(stamp, dict) and stamp.get("version") == _VERSION else None

    # -- parts ----------------------------------------------------------------------------
    def input_state(self, path: str | os.PathLike) -> list:
        """``[name, size, mtime_ns]`` of an input file (``None`` sizes when it is missing)."""
        try:
            stat = Path(path).stat()
        except OSError:
            return [self.name(path), None, None]
        return [self.name(path), stat.st_size, stat.st_mtime_ns]

    def token(self, key: str, outputs: Sequence[Path]) -> str:
        """The SHA-256 of ``outputs`` (an upstream step's files), from its stamp when unchanged."""
        recorded = (self._read(key) or {}).get("outputs", {})
        digests = []
        for path in outputs:
            entry = recorded.get(self.name(path))
            digests.append(entry["sha256"] if entry and self._same_file(path, entry) else _sha256(path))
        return fingerprint(digests)

    @staticmethod
    def _same_file(path: Path, entry: dict) -> bool:
        try:
            stat = Path(path).stat()
        except OSError:
            return False
        return stat.st_size == entry.get("size") and stat.st_mtime_ns == entry.get("mtime_ns")

    # -- decisions ------------------------------------------------------------------------
    def stale(self, key: str, outputs: Sequence[Path], parts: dict[str, Any]) -> str | None:
        """Why ``outputs`` must be (re)made, or ``None`` when they are current."""
        stamp = self._read(key)
        existing = [p for p in outputs if Path(p).is_file()]
        if stamp is None:
            if not existing:
                return "new"
            return "no stamp records what made it (an earlier version or an interrupted run wrote it)"
        if len(existing) < len(outputs):
            missing = next(p for p in outputs if not Path(p).is_file())
            return f"{self.name(missing)} is missing"
        if stamp.get("fingerprint") != fingerprint(parts):
            return "changed: " + _describe(stamp.get("parts", {}), parts)
        recorded = stamp.get("outputs", {})
        for path in outputs:
            entry = recorded.get(self.name(path))
            if entry is None:
                return f"{self.name(path)} is not in its stamp"
            if not self._same_file(path, entry):
                if Path(path).stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
                    return f"{self.name(path)} was changed after it was written"
                self._refresh(key, stamp, path)
        return None

    def redo(self, key: str, outputs: Sequence[Path], parts: dict[str, Any], what: str | None = None) -> bool:
        """:meth:`stale`, printing why a previously made output is redone; True to (re)make it."""
        reason = self.stale(key, outputs, parts)
        if reason is not None and reason != "new":
            print(f"  redoing {what or key}: {reason}", flush=True)
        return reason is not None

    def record(self, key: str, outputs: Iterable[Path], parts: dict[str, Any]) -> None:
        """Stamp freshly written ``outputs`` as made from ``parts`` (clears a pending stamp)."""
        files = {}
        for path in outputs:
            stat = Path(path).stat()
            files[self.name(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(path)}
        atomic_write_json(self._path(key), {"version": _VERSION, "fingerprint": fingerprint(parts),
                                            "parts": _jsonable(parts), "outputs": files})
        self._path(key, pending=True).unlink(missing_ok=True)

    def begin(self, key: str, parts: dict[str, Any], partial: Sequence[Path]) -> None:
        """Before a resumable training: keep ``partial`` (checkpoints) only if made from ``parts``."""
        pending = self._read(key, pending=True)
        if pending is None or pending.get("fingerprint") != fingerprint(parts):
            for path in partial:
                if Path(path).is_file():
                    print(f"  not resuming {self.name(path)}: it was made from other inputs or settings",
                          flush=True)
                    Path(path).unlink()
            self._path(key).unlink(missing_ok=True)
            atomic_write_json(self._path(key, pending=True),
                              {"version": _VERSION, "fingerprint": fingerprint(parts)})

    def _refresh(self, key: str, stamp: dict, path: Path) -> None:
        """Same bytes, new time (a copy): remember the new time, so it is not hashed again."""
        stat = Path(path).stat()
        stamp["outputs"][self.name(path)].update(mtime_ns=stat.st_mtime_ns)
        atomic_write_json(self._path(key), stamp)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _describe(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which parts differ, naming the files, cases or settings inside them."""
    new = _jsonable(new)
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            inner = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            shown = ", ".join(inner[:4]) + (", ..." if len(inner) > 4 else "")
            changes.append(f"{key} ({shown})")
        elif isinstance(before, list) and isinstance(after, list) and key == "cases":
            added = [c for c in after if c not in before]
            removed = [c for c in before if c not in after]
            changes.append(f"cases (added {added or 'none'}, removed {removed or 'none'})")
        else:
            changes.append(key)
    return "; ".join(changes) or "its stamp"
