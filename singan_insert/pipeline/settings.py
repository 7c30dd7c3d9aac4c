"""The pipeline's settings: every knob of every stage in one record, and named profiles.

A :class:`PipelineSettings` is written to ``<work>/pipeline.json`` on the first run of a work
folder, so a resumed run uses the same settings; it builds each stage's configuration from
that stage's ``preset(name, **overrides)`` (``CycleGANConfig``, ``Pix2PixConfig``,
``SegmenterConfig``; the harmonizer's ``TrainingConfig.preset`` takes no overrides yet, so its
iterations are set with ``dataclasses.replace``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal


from singan_insert.datasets.crossmoda import NUM_CLASSES
from singan_insert.errors import SinganInsertError
from singan_insert.pipeline.resample import WorkingGrid

if TYPE_CHECKING:
    from singan_insert.harmonizer.training import TrainingConfig
    from singan_insert.stages.cyclegan import CycleGANConfig
    from singan_insert.stages.pix2pix import Pix2PixConfig
    from singan_insert.stages.segmenter import SegmenterConfig

__all__ = ["PipelineSettings", "schedule"]


#: The paper's contrast factor, the pipeline's with ``appearance="fixed"``.
PAPER_CONTRAST = 0.5


@dataclass(frozen=True)
class PipelineSettings:
    """Every knob of the pipeline; build one with :meth:`profile` and ``dataclasses.replace``.

    Args:
        grid: the :class:`WorkingGrid`.
        segmenter: ``"small"`` (:class:`~singan_insert.stages.segmenter.Segmenter`) or
            ``"nnunet"`` (:class:`~singan_insert.stages.nnunet.NnUNetWorkspace`, needs the
            ``[nnunet]`` extra).
        segmenter_preset: :meth:`SegmenterConfig.preset` name for ``"small"``.
        segmenter_iterations: override the preset's steps (None: keep).
        nnunet_trainer, nnunet_configuration: for ``"nnunet"`` (trained on fold ``"all"``).
        cyclegan_preset, pix2pix_preset: the stages' presets; ``image_size`` is set to None
            (the working grid already fixes the slice size).
        cyclegan_iterations, pix2pix_iterations: total iterations :math:`T` (half constant,
            half decay), or None for the preset's.
        harmonizer_preset: ``"fast"``, ``"reference"`` or ``"tiny"``.
        harmonizer_iterations: iterations per scale (None: the preset's).
        appearance: ``"auto"`` (default: the harmonizer chooses each tumor's level in B) or
            ``"fixed"`` (the paper's method with ``contrast``).
        contrast: contrast factors :math:`\\lambda` the insertion draws from (> 0), used with
            ``appearance="fixed"``.
        annotate: mark the tumor on the harmonizer's training slice with the training label
            (``target_training_labels/``) when there is one, so that the automatic appearance
            takes B's tumor look from it (:mod:`singan_insert.insertion.annotation`); False
            trains on the same slice without it.
        augmentations: B' volumes per A case (>= 1).
        seed: seeds every stage.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    grid: WorkingGrid = field(default_factory=WorkingGrid)
    segmenter: Literal["small", "nnunet"] = "small"
    segmenter_preset: str = "cpu3d"
    segmenter_iterations: int | None = None
    nnunet_trainer: str = "nnUNetTrainer_SinganInsertShort"
    nnunet_configuration: str = "3d_fullres"
    cyclegan_preset: str = "cpu"
    cyclegan_iterations: int | None = None
    pix2pix_preset: str = "cpu"
    pix2pix_iterations: int | None = None
    harmonizer_preset: str = "fast"
    harmonizer_iterations: int | None = None
    appearance: str = "auto"
    contrast: tuple[float, ...] = (PAPER_CONTRAST,)
    annotate: bool = True
    augmentations: int = 1
    seed: int = 0
    device: str = "cpu"

    PROFILES = ("cpu", "tiny", "gpu")

    def __post_init__(self) -> None:
        if isinstance(self.grid, dict):
            object.__setattr__(self, "grid", WorkingGrid(**self.grid))
        from singan_insert.insertion.sampling import check_contrast, check_contrast_applies

        object.__setattr__(self, "contrast", tuple(check_contrast(c, "contrast factor") for c in self.contrast))
        if self.segmenter not in ("small", "nnunet"):
            raise SinganInsertError(f"segmenter must be 'small' or 'nnunet', got {self.segmenter!r}.")
        if self.appearance not in ("auto", "fixed"):
            raise SinganInsertError(f"appearance must be 'auto' or 'fixed', got {self.appearance!r}.")
        if not self.contrast:
            raise SinganInsertError("contrast needs at least one factor.")
        check_contrast_applies(set(self.contrast), self.appearance, default={PAPER_CONTRAST})
        if not isinstance(self.annotate, bool):
            raise SinganInsertError(f"annotate must be True or False, got {self.annotate!r}.")
        if self.augmentations < 1:
            raise SinganInsertError(f"augmentations must be >= 1, got {self.augmentations}.")
        for name in ("segmenter_iterations", "cyclegan_iterations", "pix2pix_iterations",
                     "harmonizer_iterations"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SinganInsertError(f"{name} must be a positive integer or None, got {value!r}.")

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> "PipelineSettings":
        """A named set of settings, with any field overridden by keyword.

        * ``"cpu"``: 64x64 px slices of 0.8 mm (1 mm apart), the CycleGAN and pix2pix ``cpu``
          presets run for 16000 iterations each, the harmonizer's ``fast`` preset, the small 3D
          segmenter (``cpu3d``); about 35 min on 2 CPU cores for ~70 small volumes. The
          presets' own 4000 iterations (about 4 epochs of ~1000 slices) are too few here:
          measured on the benchmark's data, pix2pix then does not even reproduce its training
          pairs (S_A finds the tumor in pix2pix(B') of training volumes with Dice 0.03; 0.81
          after 16000 iterations).
        * ``"tiny"``: 32x32 px slices of 0.8 mm (2 mm apart) and every ``tiny`` preset: a
          smoke run in about a minute (tests).
        * ``"gpu"``: 256x256 px slices of 0.8 mm (1.5 mm apart), the reference CycleGAN and
          pix2pix, nnU-Net's default trainer (``3d_fullres``) and the ``fast`` harmonizer, on
          CUDA: the paper's setting for real crossMoDA data.
        """
        profiles: dict[str, dict[str, Any]] = {
            "cpu": dict(cyclegan_iterations=16000, pix2pix_iterations=16000),
            "tiny": dict(
                grid=WorkingGrid((0.8, 0.8, 2.0), (32, 32, None)), segmenter_preset="tiny",
                cyclegan_preset="tiny", cyclegan_iterations=8, pix2pix_preset="tiny",
                pix2pix_iterations=8, harmonizer_preset="tiny", harmonizer_iterations=10,
            ),
            "gpu": dict(
                grid=WorkingGrid((0.8, 0.8, 1.5), (256, 256, None)), segmenter="nnunet",
                nnunet_trainer="nnUNetTrainer", cyclegan_preset="reference",
                pix2pix_preset="reference", device="cuda",
            ),
        }
        if name not in profiles:
            raise SinganInsertError(f"Unknown profile {name!r}; choose one of {sorted(profiles)}.")
        return cls(**{**profiles[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid"] = self.grid.to_dict()
        data["contrast"] = list(self.contrast)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineSettings":
        data = dict(data)
        grid = data.pop("grid", None)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SinganInsertError(f"Unknown pipeline settings {sorted(unknown)}.")
        if grid is not None:
            data["grid"] = WorkingGrid(tuple(grid["spacing"]), tuple(grid["shape"]))
        return cls(**data)

    # -- stage configurations --------------------------------------------------------------
    def cyclegan_config(self, progress: bool = False) -> "CycleGANConfig":
        """The CycleGAN preset with this run's seed, device and schedule (slice size: the grid's)."""
        from singan_insert.stages.cyclegan import CycleGANConfig

        return CycleGANConfig.preset(self.cyclegan_preset, image_size=None, seed=self.seed,
                                     device=self.device, progress=progress,
                                     **schedule(self.cyclegan_iterations))

    def pix2pix_config(self, progress: bool = False) -> "Pix2PixConfig":
        """The pix2pix preset with this run's seed, device and schedule (slice size: the grid's)."""
        from singan_insert.stages.pix2pix import Pix2PixConfig

        return Pix2PixConfig.preset(self.pix2pix_preset, image_size=None, seed=self.seed,
                                    device=self.device, progress=progress,
                                    **schedule(self.pix2pix_iterations))

    def segmenter_config(self) -> "SegmenterConfig":
        """The small segmenter's preset for crossMoDA's three classes."""
        from singan_insert.stages.segmenter import SegmenterConfig

        return SegmenterConfig.preset(self.segmenter_preset, num_classes=NUM_CLASSES,
                                      **_iterations(self.segmenter_iterations))

    def harmonizer_config(self) -> "TrainingConfig":
        """The harmonizer's preset, with this run's iterations per scale."""
        from singan_insert.harmonizer.training import TrainingConfig

        # The harmonizer's preset takes no overrides yet, hence the replace.
        return replace(TrainingConfig.preset(self.harmonizer_preset), **_iterations(self.harmonizer_iterations))


def _iterations(total: int | None) -> dict[str, int]:
    return {} if total is None else {"iterations": total}


def schedule(total: int | None) -> dict[str, int]:
    """Stage-config overrides for ``total`` iterations :math:`T`: half constant, half decay.

    ``{"iterations": T // 2, "decay_iterations": T - T // 2, "checkpoint_every": min(500, T)}``
    (``{}`` for None: keep the preset's schedule).
    """
    if total is None:
        return {}
    # Keep checkpoints within the run: at most every 500 iterations, at least once at the end.
    return {"iterations": total // 2, "decay_iterations": total - total // 2,
            "checkpoint_every": max(1, min(500, total))}
