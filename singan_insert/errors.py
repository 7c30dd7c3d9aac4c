"""Exceptions raised by singan-insert.

Every error a user can trigger with bad input derives from :class:`SinganInsertError`
(itself a :class:`ValueError`), so callers can catch one type, and messages say what to do.
"""


class SinganInsertError(ValueError):
    """Base class for user-facing errors of singan-insert."""


class ModelFileError(SinganInsertError):
    """A model file is missing, truncated, corrupt, foreign or of another format version."""


class MissingExtraError(ImportError):
    """An optional dependency (an ``extra``) is needed for this feature."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the optional package {package!r}. "
            f"Install it with: pip install 'singan-insert[{extra}]'"
        )
