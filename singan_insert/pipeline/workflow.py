"""The paper's Fig. 1 workflow on crossMoDA-layout folders, one method per stage.

Modality A (ceT1) is labelled, modality B (hrT2) is not; the goal is a segmenter for B:

1. train :math:`S_A` on the A images and labels (the small built-in U-Net on a CPU, or
   nnU-Net v2);
2. train CycleGAN A <-> B (unpaired) and translate every A image to B: the "fake hrT2"
   :math:`\\varphi^0_{AB}(I)`, in which tumors tend to vanish;
3. train the harmonizer on ONE hrT2 slice that shows a tumor;
4. paste each A tumor into its own fake hrT2 and harmonize it: the volumes :math:`B'`
   (:mod:`singan_insert.batch`, the engine of ``singan-insert insert``). The naive pastes of the
   very same insertions (same placement, intensity mapping and :math:`\\lambda`, no
   harmonization) are written beside them for the ablation;
5. train pix2pix :math:`B' \\to A` on the pairs (:math:`B'`, its A image);
6. translate the hrT2 validation images to A (pix2pix; CycleGAN's :math:`B \\to A` generator
   for the baseline) and segment them with :math:`S_A`;
7. score the predictions against the validation labels (Dice, ASSD; the paper's Table 1).

**Working grid.** The slice-wise GANs see 2D slices at a fixed pixel count, so every input
volume is first resampled, along its own voxel axes, onto a
:class:`~singan_insert.pipeline.resample.WorkingGrid` (:mod:`singan_insert.pipeline.resample`);
all stages run on these grids, and predictions are resampled back onto each validation scan's
own grid before scoring. The settings of a run are a
:class:`~singan_insert.pipeline.settings.PipelineSettings`; the data set is a
:class:`~singan_insert.datasets.crossmoda.CrossModaData`.

**Work folder** (a re-run redoes only the outputs whose stamp no longer matches what decides
them: settings, inputs, case list, upstream outputs; see :mod:`.stamps`)::

    <work>/pipeline.json                    the data root and PipelineSettings of this run
    <work>/grid/source/<name>_ceT1, _Label  A on the working grid; _fakehrT2 from step 2
    <work>/grid/target/<name>_hrT2          B training images on the working grid
    <work>/grid/validation/<name>_hrT2      B validation images on the working grid
    <work>/segmenter/                       S_A (segmenter.safetensors, or an nnU-Net workspace)
    <work>/cyclegan/, harmonizer/           the trained models (with checkpoints)
    <work>/bprime/{harmonized,naive}/       <name>_aug<k>_image / _label .nii.gz and .json
    <work>/pix2pix/{harmonized,naive}/      the pix2pix models
    <work>/translated/<method>/             validation images translated to A (working grid)
    <work>/predictions_grid/<method>/       S_A's label maps on the working grid
    <work>/predictions/<method>/            <name>_Label.nii.gz on each validation scan's grid
    <work>/evaluation/                      table1.md, table1.json
    <work>/timings.json                     seconds per step
    <work>/stamps/                          what made each output (:mod:`.stamps`)

Methods (:data:`METHODS`): ``"baseline"`` CycleGAN :math:`B \\to A` then :math:`S_A`;
``"ours"`` pix2pix trained on harmonized :math:`B'` then :math:`S_A`; ``"naive"`` pix2pix
trained on the naive pastes then :math:`S_A`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from singan_insert.datasets.crossmoda import (
    LABEL,
    SOURCE_MODALITY,
    TARGET_MODALITY,
    TUMOR_LABEL,
    CrossModaData,
    SourceCase,
    case_path,
    natural_key,
    simulate_crossmoda,  # noqa: F401 - benchmarks/bench_pipeline.py imports it from here
)
from singan_insert.devices import select_device
from singan_insert.errors import SinganInsertError
from singan_insert.insertion.placement import spacing_from_affine
from singan_insert.io import atomic_write_json, write_nifti
from singan_insert.pipeline.resample import resample_image, resample_labels
from singan_insert.pipeline.settings import PipelineSettings
from singan_insert.pipeline.stamps import Stamps

__all__ = ["METHODS", "METHOD_TITLES", "CrossModaPipeline", "read_volume", "write_volume"]

Method = Literal["baseline", "ours", "naive"]
METHODS: tuple[str, ...] = ("baseline", "ours", "naive")
METHOD_TITLES: dict[str, str] = {
    "baseline": "Baseline: CycleGAN(B->A) + S_A",
    "ours": "Ours: pix2pix(B'->A) + S_A",
    "naive": "Ablation: naive paste, no harmonization",
}
#: The variant of B' each pix2pix method is trained on.
_VARIANT = {"ours": "harmonized", "naive": "naive"}
FAKE_TARGET_SUFFIX = "fakehrT2"
NNUNET_DATASET_ID = 501
NNUNET_DATASET_NAME = "SourceVS"
_SLICE_AXIS = 2
_NIFTI = ".nii.gz"


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a 3D NIfTI volume (data as stored; trailing singleton axes dropped)."""
    import nibabel as nib

    if not Path(path).is_file():
        raise SinganInsertError(f"{path} does not exist: re-run the step that writes it (each step redoes "
                                "its missing outputs; run_all.py runs them all).")
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SinganInsertError(f"{path} has shape {data.shape}; a 3D volume is expected.")
    return data, np.asarray(image.affine, float)


def write_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, header=None) -> Path:
    """Write a NIfTI volume atomically (:func:`singan_insert.io.write_nifti`)."""
    return write_nifti(path, data, affine, header=header)


def _locked(method):
    """Run a step under the work folder's lock, so two runs never write one folder at once."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.locked():
            return method(self, *args, **kwargs)
    return wrapper


class CrossModaPipeline:
    """The workflow of the module docstring on one data set and one work folder.

    Args:
        data: the :class:`CrossModaData`.
        work_dir: the work folder (created). Its ``pipeline.json`` remembers the data root and
            settings of the first call; later calls must agree (or pass ``settings=None``).
        settings: :class:`PipelineSettings`; None reuses the work folder's, else ``"cpu"``.
        progress: show progress bars while training.
    """

    def __init__(self, data: CrossModaData, work_dir: str | os.PathLike,
                 settings: PipelineSettings | None = None, *, progress: bool = False):
        self.data = data
        self.work = Path(work_dir)
        self.progress = progress
        self.work.mkdir(parents=True, exist_ok=True)
        self.stamps = Stamps(self.work)
        self._lock_depth = 0
        self._reported: set[str] = set()
        record_path = self.work / "pipeline.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record is not None:
            stored = PipelineSettings.from_dict(record["settings"])
            if settings is not None and settings != stored:
                changed = sorted(k for k, v in settings.to_dict().items() if stored.to_dict()[k] != v)
                raise SinganInsertError(
                    f"{self.work} was started with other settings (differences: {changed}). Use "
                    "the same settings (omit --profile and overrides to reuse them) or another --work.")
            # Relative to the work folder when inside it, so a copied work folder keeps its data.
            if self.stamps.resolve(record["data_root"]).resolve() != data.root.resolve():
                raise SinganInsertError(
                    f"{self.work} belongs to the data set {self.stamps.resolve(record['data_root'])}, "
                    f"not {data.root}; use another --work folder.")
            settings = stored
        settings = settings or PipelineSettings.profile("cpu")
        if record is None:
            atomic_write_json(record_path, {"data_root": self.stamps.name(data.root.resolve()),
                                            "settings": settings.to_dict()})
        self.settings = settings

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the work folder's lock (re-entrant: steps call their upstream steps)."""
        from singan_insert.batch import output_lock

        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        try:
            lock = output_lock(self.work)
            lock.__enter__()
        except SinganInsertError:
            raise SinganInsertError(
                f"Another run is using the work folder {self.work}. Wait for it to finish, or use "
                "another --work.") from None
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            lock.__exit__(None, None, None)

    # -- folders --------------------------------------------------------------------------
    @property
    def grid_dir(self) -> Path:
        return self.work / "grid"

    def grid_source(self, name: str, kind: str = SOURCE_MODALITY) -> Path:
        """``grid/source/<name>_<kind>.nii.gz`` (kind: ``ceT1``, ``Label``, ``fakehrT2``)."""
        return case_path(self.grid_dir / "source", name, kind)

    def grid_target(self, name: str) -> Path:
        return case_path(self.grid_dir / "target", name, TARGET_MODALITY)

    def grid_validation(self, name: str) -> Path:
        return case_path(self.grid_dir / "validation", name, TARGET_MODALITY)

    def bprime_dir(self, variant: str) -> Path:
        return self.work / "bprime" / variant

    def translated(self, method: str, name: str) -> Path:
        return case_path(self.work / "translated" / method, name, SOURCE_MODALITY)

    def prediction(self, method: str, name: str) -> Path:
        """The prediction of ``method`` for validation scan ``name``, on that scan's grid."""
        return case_path(self.work / "predictions" / method, name, LABEL)

    @contextlib.contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        path = self.work / "timings.json"
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[step] = round(timings.get(step, 0.0) + time.perf_counter() - started, 2)
        path.write_text(json.dumps(timings, indent=2))

    # -- stamps ---------------------------------------------------------------------------
    def _key(self, path: Path) -> str:
        return self.stamps.name(path)

    def _token(self, path: Path, *more: Path) -> str:
        """The token of the output ``path`` (with its companion files ``more``), see :mod:`.stamps`."""
        return self.stamps.token(self._key(path), [path, *more])

    def _settings(self, *names: str) -> dict[str, Any]:
        values = self.settings.to_dict()
        return {name: values[name] for name in names}

    def _say(self, message: str) -> None:
        """Print ``message`` once per pipeline object (steps call their upstream steps)."""
        if message not in self._reported:
            self._reported.add(message)
            print(f"  {message}", flush=True)

    # -- 0. the working grid --------------------------------------------------------------
    def source_cases(self) -> list[SourceCase]:
        """The data set's labelled ceT1 cases, less those whose label is on another grid.

        Such a label would teach S_A a shifted tumor; the case is skipped with the insertion's
        own message (:func:`singan_insert.insertion.placement.check_same_grid`).
        """
        import nibabel as nib

        from singan_insert.insertion.placement import check_same_grid

        for label in self.data.unpaired_labels():
            self._say(f"ignored {label}: there is no ceT1 scan of that case beside it.")
        cases = []
        for case in self.data.source_cases():
            image, label = nib.load(str(case.image)), nib.load(str(case.label))
            try:
                check_same_grid(image.shape[:3], image.affine, label.shape[:3], label.affine,
                                f"source image {case.image}", f"source label {case.label}")
            except SinganInsertError as error:
                self._say(f"skipped {case.name}: {error}")
                continue
            cases.append(case)
        if not cases:
            raise SinganInsertError("No usable source case; see the messages above.")
        return cases

    @_locked
    def prepare(self) -> None:
        """Resample every input volume onto its working grid (redoing those whose input changed)."""
        from singan_insert.checks import check_finite

        grid = self.settings.grid
        jobs: list[tuple[Path, Path, bool]] = []
        for case in self.source_cases():
            jobs += [(case.image, self.grid_source(case.name), False),
                     (case.label, self.grid_source(case.name, LABEL), True)]
        jobs += [(path, self.grid_target(name), False) for name, path in self.data.target_images()]
        jobs += [(path, self.grid_validation(name), False) for name, path in self.data.validation_images()]
        parts = {job[1]: {"grid": grid.to_dict(), "input": self.stamps.input_state(job[0]), "label": job[2]}
                 for job in jobs}
        todo = [job for job in jobs if self.stamps.redo(self._key(job[1]), [job[1]], parts[job[1]])]
        if not todo:
            return
        with self._timed("prepare"):
            for source, destination, is_label in todo:
                data, affine = read_volume(source)
                check_finite(data, f"input {source}")
                shape, grid_affine = grid.grid_for(data.shape, affine)
                if is_label:
                    resampled = resample_labels(data, affine, grid_affine, shape)
                else:
                    resampled = resample_image(data, affine, grid_affine, shape)
                write_volume(destination, resampled, grid_affine)
                self.stamps.record(self._key(destination), [destination], parts[destination])

    def to_native(self, label: np.ndarray, grid_affine: np.ndarray, reference: Path) -> np.ndarray:
        """A label map on a working grid, resampled onto the grid of the volume ``reference``."""
        data, affine = read_volume(reference)
        return resample_labels(label, grid_affine, affine, data.shape)

    # -- 1. S_A ---------------------------------------------------------------------------
    @property
    def segmenter_path(self) -> Path:
        return self.work / "segmenter" / "segmenter.safetensors"

    def _nnunet_workspace(self):
        from singan_insert.stages.nnunet import NnUNetWorkspace

        return NnUNetWorkspace(self.work / "segmenter" / "nnunet")

    def _nnunet_fold(self) -> Path:
        """nnU-Net's fold folder of S_A (fold ``all``), where ``checkpoint_final.pth`` lands."""
        settings = self.settings
        trainer = settings.nnunet_trainer.rsplit(".", 1)[-1]  # a dotted path names the class last
        return (self._nnunet_workspace().results / f"Dataset{NNUNET_DATASET_ID:03d}_{NNUNET_DATASET_NAME}"
                / f"{trainer}__nnUNetPlans__{settings.nnunet_configuration}" / "fold_all")

    def _segmenter_outputs(self) -> list[Path]:
        if self.settings.segmenter == "nnunet":
            return [self._nnunet_fold() / "checkpoint_final.pth"]
        return [self.segmenter_path]

    def _segmenter_token(self) -> str:
        outputs = self._segmenter_outputs()
        if not outputs[0].is_file():
            raise SinganInsertError("S_A is not trained yet: run step 1 (01_train_source_segmenter.py).")
        return self.stamps.token("segmenter", outputs)

    @_locked
    def train_source_segmenter(self) -> Path:
        """Step 1: train :math:`S_A` on the ceT1 scans and labels (working grid).

        Retrained from scratch when the case list, a case's volumes or the settings changed.
        Returns the model file (``"small"``) or nnU-Net's fold folder (``"nnunet"``).
        """
        settings = self.settings
        if settings.segmenter == "nnunet":
            from singan_insert.stages.nnunet import require_nnunet

            require_nnunet("Training S_A with nnU-Net (--segmenter nnunet)")
        self.prepare()
        cases = self.source_cases()
        parts = {"settings": self._settings("segmenter", "segmenter_preset", "segmenter_iterations", "seed",
                                            "nnunet_trainer", "nnunet_configuration"),
                 "cases": [c.name for c in cases],
                 "volumes": {c.name: [self._token(self.grid_source(c.name)),
                                      self._token(self.grid_source(c.name, LABEL))] for c in cases}}
        outputs = self._segmenter_outputs()
        result = self._nnunet_fold() if settings.segmenter == "nnunet" else self.segmenter_path
        if not self.stamps.redo("segmenter", outputs, parts, "S_A"):
            return result
        if settings.segmenter == "nnunet":
            from singan_insert.stages.nnunet import NnUNetCase

            # nnU-Net would resume the old data's fold: export_dataset(overwrite=True) removes it.
            workspace = self._nnunet_workspace()
            with self._timed("1_segmenter"):
                dataset = workspace.export_dataset(
                    NNUNET_DATASET_ID, NNUNET_DATASET_NAME,
                    [NnUNetCase(c.name, (self.grid_source(c.name),), self.grid_source(c.name, LABEL))
                     for c in cases],
                    channel_names=(SOURCE_MODALITY,), overwrite=True)
                workspace.plan_and_preprocess(dataset, (settings.nnunet_configuration,))
                workspace.train(dataset, settings.nnunet_configuration, "all",
                                trainer=settings.nnunet_trainer, device=_nnunet_device(settings.device))
        else:
            from singan_insert.stages.segmenter import Segmenter

            with self._timed("1_segmenter"):
                images = [read_volume(self.grid_source(c.name))[0] for c in cases]
                labels = [read_volume(self.grid_source(c.name, LABEL))[0] for c in cases]
                segmenter = Segmenter(settings.segmenter_config(), seed=settings.seed,
                                      device=_torch_device(settings.device))
                segmenter.fit(images, labels, progress=self.progress)
                segmenter.save(self.segmenter_path)
        self.stamps.record("segmenter", outputs, parts)
        return result

    def segment(self, grid_images: Sequence[Path], out_dir: Path) -> list[Path]:
        """Segment working-grid volumes with :math:`S_A`; writes ``<out_dir>/<stem>.nii.gz``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        stems = [p.name.split(".nii")[0] for p in grid_images]
        outputs = [out_dir / f"{stem}{_NIFTI}" for stem in stems]
        if self.settings.segmenter == "nnunet":
            from singan_insert.stages.nnunet import NnUNetCase

            self._segmenter_token()  # S_A must be trained
            cases = [NnUNetCase(re.sub(r"[^A-Za-z0-9_\-]", "_", stem), (path,))
                     for stem, path in zip(stems, grid_images)]
            written = self._nnunet_workspace().predict(
                NNUNET_DATASET_ID, cases, out_dir, self.settings.nnunet_configuration, ("all",),
                trainer=self.settings.nnunet_trainer,
                device=_nnunet_device(self.settings.device))
            for source, destination in zip(written, outputs):
                if source != destination:
                    source.replace(destination)
            return outputs
        self._segmenter_token()  # S_A must be trained
        from singan_insert.stages.segmenter import Segmenter

        segmenter = Segmenter.load(self.segmenter_path, device=_torch_device(self.settings.device))
        for path, output in zip(grid_images, outputs):
            data, affine = read_volume(path)
            write_volume(output, segmenter.predict(data.astype(np.float32)), affine)
        return outputs

    # -- 2. CycleGAN ----------------------------------------------------------------------
    @property
    def cyclegan_path(self) -> Path:
        from singan_insert.stages.cyclegan import MODEL_NAME

        return self.work / "cyclegan" / MODEL_NAME

    @_locked
    def train_cyclegan(self):
        """Step 2a: CycleGAN between the ceT1 and the hrT2 training scans (unpaired).

        Retrained from scratch (its checkpoint discarded) when a scan or the case lists changed.
        """
        from singan_insert.stages._training import CHECKPOINT_NAME
        from singan_insert.stages.cyclegan import CycleGAN, train_cyclegan

        self.prepare()
        domain_a = {c.name: self.grid_source(c.name) for c in self.source_cases()}
        domain_b = {name: self.grid_target(name) for name, _ in self.data.target_images()}
        parts = {"settings": self._settings("cyclegan_preset", "cyclegan_iterations", "seed"),
                 "source": {name: self._token(path) for name, path in domain_a.items()},
                 "target": {name: self._token(path) for name, path in domain_b.items()}}
        if not self.stamps.redo("cyclegan", [self.cyclegan_path], parts, "the CycleGAN"):
            return CycleGAN.load(self.cyclegan_path)
        self.stamps.begin("cyclegan", parts, [self.cyclegan_path.parent / CHECKPOINT_NAME])
        with self._timed("2_cyclegan_train"):
            model = train_cyclegan(list(domain_a.values()), list(domain_b.values()), self.cyclegan_path.parent,
                                   self.settings.cyclegan_config(self.progress))
        self.stamps.record("cyclegan", [self.cyclegan_path], parts)
        return model

    @_locked
    def translate_sources(self) -> list[Path]:
        """Step 2b: each ceT1 scan translated to hrT2 (``grid/source/<name>_fakehrT2``)."""
        from singan_insert.stages.cyclegan import CycleGAN

        self._require(self.cyclegan_path, "CycleGAN", "02_cyclegan.py")
        model_token = self.stamps.token("cyclegan", [self.cyclegan_path])
        model = None
        outputs = []
        with self._timed("2_cyclegan_translate"):
            for case in self.source_cases():
                output = self.grid_source(case.name, FAKE_TARGET_SUFFIX)
                parts = {"model": model_token, "image": self._token(self.grid_source(case.name))}
                if self.stamps.redo(self._key(output), [output], parts):
                    model = model or CycleGAN.load(self.cyclegan_path)
                    image = model.translate(self.grid_source(case.name), "a_to_b")
                    write_volume(output, np.asarray(image.dataobj, np.float32), image.affine)
                    self.stamps.record(self._key(output), [output], parts)
                outputs.append(output)
        return outputs

    # -- 3. harmonizer --------------------------------------------------------------------
    @property
    def harmonizer_dir(self) -> Path:
        return self.work / "harmonizer"

    @_locked
    def train_harmonizer(self, case: str | None = None, slice_index: int | str = "auto",
                         label: str | os.PathLike | None = None):
        """Step 3: train the harmonizer on ONE hrT2 training slice (working grid).

        Args:
            case: the hrT2 training scan; default the first one with a label in
                ``target_training_labels/``, else the first one.
            slice_index: ``"auto"`` (largest label area; the middle slice without a label) or
                an axial slice index of the scan's OWN grid (as seen in a viewer).
            label: a (rough) tumor label on the scan's own grid; default the one in
                ``target_training_labels/``, if any.
        """
        from singan_insert.harmonizer.model import Harmonizer
        from singan_insert.harmonizer.training import CHECKPOINT_NAME, MODEL_NAME, train_harmonizer
        from singan_insert.harmonizer.training_slice import load_training_slice

        self.prepare()
        model_file = self.harmonizer_dir / MODEL_NAME
        slice_label = self.harmonizer_dir / "slice_label.nii.gz"
        targets = dict(self.data.target_images())
        if case is None:
            labelled = [name for name in targets if self.data.target_label(name) is not None]
            case = (labelled or list(targets))[0]
        if case not in targets:
            raise SinganInsertError(f"No hrT2 training scan named {case!r}; choose one of {sorted(targets)[:5]}...")
        label = Path(label) if label is not None else self.data.target_label(case)
        # The training slice is the step's input: another --case/--slice/--label retrains.
        parts = {"settings": self._settings("harmonizer_preset", "harmonizer_iterations", "seed"),
                 "case": case, "slice": slice_index, "scan": self._token(self.grid_target(case)),
                 "label": None if label is None else self.stamps.input_state(label)}
        if not self.stamps.redo("harmonizer", [model_file], parts, "the harmonizer"):
            model = self._match_annotation(Harmonizer.load(model_file), model_file, slice_label)
            self.stamps.record("harmonizer", [model_file], parts)  # an annotation changes its bytes
            return model
        self.stamps.begin("harmonizer", parts, [self.harmonizer_dir / CHECKPOINT_NAME])
        slice_label.unlink(missing_ok=True)  # the old slice's label must not annotate the new slice
        grid_path = self.grid_target(case)
        grid_data, grid_affine = read_volume(grid_path)
        grid_label = None
        if slice_index == "auto" and label is not None:
            native_label, native_affine = read_volume(label)
            tumor = (native_label == TUMOR_LABEL) if np.any(native_label == TUMOR_LABEL) else native_label > 0
            grid_label = write_volume(slice_label,
                               resample_labels(tumor.astype(np.uint8), native_affine, grid_affine,
                                               grid_data.shape), grid_affine)
        grid_index = slice_index
        if slice_index != "auto":
            grid_index = self._grid_slice(targets[case], int(slice_index), grid_affine, grid_data.shape)
        training = load_training_slice(grid_path, axis=_SLICE_AXIS, index=grid_index,
                                       label_path=grid_label, modality=TARGET_MODALITY)
        annotation = training.tumor_annotation() if self.settings.annotate and training.label is not None else None
        with self._timed("3_harmonizer"):
            model = train_harmonizer(
                training.image, self.settings.harmonizer_config(), out_dir=self.harmonizer_dir,
                seed=self.settings.seed, spacing=training.spacing, device=_torch_device(self.settings.device),
                provenance={**training.provenance, "case": case}, progress=self.progress, annotation=annotation)
        self.stamps.record("harmonizer", [model_file], parts)
        return model

    def _match_annotation(self, model, model_file: Path, slice_label: Path):
        """A trained model annotated as the settings say (annotating needs no retraining)."""
        from singan_insert.harmonizer.training_slice import load_training_slice

        wanted = self.settings.annotate and slice_label.is_file()
        if wanted and model.tumor_annotation is None:
            index, case = model.provenance.get("slice_index"), model.provenance.get("case")
            if index is None or case is None:
                raise SinganInsertError(f"{model_file} records no training scan and slice; delete it to retrain.")
            training = load_training_slice(self.grid_target(case), axis=_SLICE_AXIS, index=int(index),
                                           label_path=slice_label)
            model.annotate(training.tumor_annotation()).save(model_file)
        elif not wanted and model.tumor_annotation is not None:
            model.annotate(None).save(model_file)
        return model

    def _grid_slice(self, native: Path, index: int, grid_affine: np.ndarray, grid_shape) -> int:
        data, affine = read_volume(native)
        if not 0 <= index < data.shape[_SLICE_AXIS]:
            raise SinganInsertError(f"Slice {index} is outside {native} (0..{data.shape[_SLICE_AXIS] - 1}).")
        centre = (np.asarray(data.shape, float) - 1) / 2
        centre[_SLICE_AXIS] = index
        world = affine[:3, :3] @ centre + affine[:3, 3]
        grid_index = np.linalg.inv(grid_affine)[:3] @ np.append(world, 1.0)
        return int(np.clip(round(grid_index[_SLICE_AXIS]), 0, grid_shape[_SLICE_AXIS] - 1))

    # -- 4. insertion ---------------------------------------------------------------------
    @_locked
    def insert_tumors(self) -> dict[str, list[Path]]:
        """Step 4: every A tumor into its own fake hrT2, harmonized (B') and naively pasted.

        The harmonized volumes come from :func:`singan_insert.batch.augment_case` (exactly what
        ``singan-insert insert --data-root <work>/grid/source --target-suffix fakehrT2`` writes);
        each naive paste replays the recorded parameters of its harmonized twin with
        ``return_composite=True``, so the two differ by the harmonization alone. A tumor that
        cannot be placed (e.g. cut by the working grid's border) is skipped with a message.
        A B' is redone when its fake hrT2, its A case or the harmonizer changed.

        Returns:
            ``{"harmonized": [...], "naive": [...]}``: the written image paths.
        """
        return {variant: [image for _, image in pairs] for variant, pairs in self._insert().items()}

    def _insert(self) -> dict[str, list[tuple[str, Path]]]:
        """:meth:`insert_tumors`, with each B' image's A case: ``{variant: [(case, image), ...]}``."""
        from singan_insert.batch import Case, InsertSettings, augment_case, output_paths
        from singan_insert.harmonizer.training import MODEL_NAME
        from singan_insert.io import atomic_write_bytes
        from singan_insert.insertion.insert import InsertionParameters, insert_tumor
        from singan_insert.insertion.model_cache import load_harmonizer
        from singan_insert.insertion.placement import SourceTumor

        self.translate_sources()
        model = self.harmonizer_dir
        model_file = model / MODEL_NAME
        if not model_file.is_file():
            raise SinganInsertError("The harmonizer is not trained yet: run step 3 (03_train_harmonizer.py).")
        model_token = self.stamps.token("harmonizer", [model_file])
        settings = InsertSettings(num=self.settings.augmentations, appearance=self.settings.appearance,
                                  # the automatic appearance takes no contrast factor
                                  contrast=set(self.settings.contrast) if self.settings.appearance == "fixed" else 1.0,
                                  axis=_SLICE_AXIS, seed=self.settings.seed, source_label_value=TUMOR_LABEL,
                                  label_value=TUMOR_LABEL)
        harmonized_dir, naive_dir = self.bprime_dir("harmonized"), self.bprime_dir("naive")
        harmonized_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, list[tuple[str, Path]]] = {"harmonized": [], "naive": []}
        with self._timed("4_insert"):
            for source in self.source_cases():
                # Absolute paths: the records must not depend on the current folder.
                case = Case(source.name, self.grid_source(source.name, FAKE_TARGET_SUFFIX).resolve(),
                            self.grid_source(source.name).resolve(),
                            self.grid_source(source.name, LABEL).resolve())
                inputs = {"target": self._token(case.target), "image": self._token(case.source_image),
                          "label": self._token(case.source_label)}
                for k in range(settings.num):
                    paths = output_paths(harmonized_dir, case, k)
                    naive = output_paths(naive_dir, case, k)
                    files = [paths["image"], paths["label"], paths["record"]]
                    naive_files = [naive["image"], naive["label"], naive["record"]]
                    parts = {"settings": settings.to_dict(), "augmentation": k, "model": model_token,
                             "inputs": inputs}
                    try:
                        if self.stamps.redo(self._key(paths["image"]), files, parts):
                            augment_case(case, k, str(model), settings, harmonized_dir)
                            self.stamps.record(self._key(paths["image"]), files, parts)
                        # Not the record: it holds run times, which would redo all below at each redo.
                        naive_parts = {"model": model_token,
                                       "harmonized": self._token(paths["image"], paths["label"])}
                        if self.stamps.redo(self._key(naive["image"]), naive_files, naive_parts):
                            record = json.loads(paths["record"].read_text())
                            target, affine = read_volume(case.target)
                            tumor = SourceTumor.from_files(case.source_image, case.source_label,
                                                           label_value=TUMOR_LABEL)
                            result = insert_tumor(target.astype(np.float32), affine, tumor,
                                                  load_harmonizer(model),
                                                  InsertionParameters.from_dict(record["parameters"]),
                                                  return_composite=True)
                            write_volume(naive["image"], result.composite.astype(np.float32), affine)
                            write_volume(naive["label"], result.label, affine)
                            atomic_write_bytes(naive["record"], json.dumps(
                                {**record, "naive_paste": True}, indent=2, default=str).encode())
                            self.stamps.record(self._key(naive["image"]), naive_files, naive_parts)
                    except SinganInsertError as error:
                        print(f"  skipped {case.name} aug {k}: {error}")
                        continue
                    written["harmonized"].append((case.name, paths["image"]))
                    written["naive"].append((case.name, naive["image"]))
        if not written["harmonized"]:
            raise SinganInsertError("No tumor could be inserted; see the messages above.")
        return written

    # -- 5. pix2pix -----------------------------------------------------------------------
    def pix2pix_path(self, variant: str) -> Path:
        from singan_insert.stages.pix2pix import MODEL_NAME

        return self.work / "pix2pix" / variant / MODEL_NAME

    @_locked
    def train_pix2pix(self, variant: Literal["harmonized", "naive"] = "harmonized"):
        """Step 5: pix2pix :math:`B' \\to A` on the (B', ceT1) pairs of ``variant``.

        The pairs are those of the data set's current cases (step 4 is brought up to date
        first); pix2pix is retrained from scratch when a pair or the case list changed.
        """
        from singan_insert.stages._training import CHECKPOINT_NAME
        from singan_insert.stages.pix2pix import Pix2Pix, train_pix2pix

        if variant not in ("harmonized", "naive"):
            raise SinganInsertError(f"variant must be 'harmonized' or 'naive', got {variant!r}.")
        path = self.pix2pix_path(variant)
        pairs = [(image, self.grid_source(name)) for name, image in self._insert()[variant]]
        parts = {"settings": self._settings("pix2pix_preset", "pix2pix_iterations", "seed"),
                 "pairs": {self._key(image): [self._token(image, self._bprime_label(image)),
                                              self._token(source)] for image, source in pairs}}
        key = f"pix2pix/{variant}"
        if not self.stamps.redo(key, [path], parts, f"pix2pix ({variant})"):
            return Pix2Pix.load(path)
        self.stamps.begin(key, parts, [path.parent / CHECKPOINT_NAME])
        with self._timed(f"5_pix2pix_{variant}"):
            model = train_pix2pix(pairs, path.parent, self.settings.pix2pix_config(self.progress))
        self.stamps.record(key, [path], parts)
        return model

    @staticmethod
    def _bprime_label(image: Path) -> Path:
        """The label map written with a B' image (pix2pix depends on both, not on the record)."""
        return image.with_name(image.name[:-len(f"_image{_NIFTI}")] + f"_label{_NIFTI}")

    # -- 6. translate + segment the validation scans --------------------------------------
    def _model_of(self, method: str) -> tuple[str, Path]:
        """The stamp key and file of the generator ``method`` translates with."""
        if method == "baseline":
            self._require(self.cyclegan_path, "CycleGAN", "02_cyclegan.py")
            return "cyclegan", self.cyclegan_path
        path = self.pix2pix_path(_VARIANT[method])
        self._require(path, "pix2pix", "05_pix2pix.py")
        return f"pix2pix/{_VARIANT[method]}", path

    @_locked
    def translate_validation(self, method: Method) -> list[Path]:
        """Translate every validation hrT2 to ceT1 with ``method``'s generator (working grid)."""
        from singan_insert.stages.cyclegan import CycleGAN
        from singan_insert.stages.pix2pix import Pix2Pix

        _check_method(method)
        self.prepare()
        key, model_file = self._model_of(method)
        model_token = self.stamps.token(key, [model_file])
        model = None
        outputs = []
        for name, _ in self.data.validation_images():
            output = self.translated(method, name)
            parts = {"model": model_token, "scan": self._token(self.grid_validation(name))}
            if self.stamps.redo(self._key(output), [output], parts):
                if model is None:
                    if method == "baseline":
                        model = functools.partial(CycleGAN.load(model_file).translate, direction="b_to_a")
                    else:
                        model = Pix2Pix.load(model_file).translate
                image = model(self.grid_validation(name))
                write_volume(output, np.asarray(image.dataobj, np.float32), image.affine)
                self.stamps.record(self._key(output), [output], parts)
            outputs.append(output)
        return outputs

    @_locked
    def segment_validation(self, method: Method) -> list[Path]:
        """Step 6: translate (``method``), segment with :math:`S_A`, resample to each scan's grid.

        A prediction is redone when its translation, S_A or its scan changed.
        """
        import nibabel as nib

        _check_method(method)
        validation = self.data.validation_images()
        translated = self.translate_validation(method)
        segmenter = self._segmenter_token()
        grid_folder = self.work / "predictions_grid" / method
        todo = []
        for (name, native), image in zip(validation, translated):
            output = self.prediction(method, name)
            outputs = [output, case_path(grid_folder, name, SOURCE_MODALITY)]
            parts = {"translated": self._token(image), "segmenter": segmenter,
                     "scan": self.stamps.input_state(native)}
            if self.stamps.redo(self._key(output), outputs, parts):
                todo.append((name, native, image, outputs, parts))
        if todo:
            with self._timed(f"6_segment_{method}"):
                grid_predictions = self.segment([image for _, _, image, _, _ in todo], grid_folder)
                for (name, native, _, outputs, parts), grid_prediction in zip(todo, grid_predictions):
                    label, grid_affine = read_volume(grid_prediction)
                    scan = nib.load(str(native))
                    # The scan's header (qform/sform codes, units) describes its prediction too.
                    write_volume(outputs[0], self.to_native(label, grid_affine, native), scan.affine,
                                 header=scan.header)
                    self.stamps.record(self._key(outputs[0]), outputs, parts)
        return [self.prediction(method, name) for name, _ in validation]

    # -- 7. evaluation --------------------------------------------------------------------
    @_locked
    def evaluate(self, methods: Sequence[str] = METHODS, *, extra: dict[str, dict[str, list[float]]] | None = None,
                 write: bool = True) -> dict[str, Any]:
        """Step 7: Dice and ASSD of the tumor (label 1) per validation scan; the Table 1 report.

        Args:
            methods: methods whose predictions exist (step 6).
            extra: more rows for the table, ``{title: {"dice": [...], "assd": [...]}}``.
            write: also write ``<work>/evaluation/table1.{md,json}``.

        Returns:
            ``{"table": table1_report(...), "per_case": {method: [{case, dice, assd}...]}}``.
        """
        from singan_insert.evaluation.metrics import segmentation_scores, table1_report

        validation = self.data.validation_images()
        truths = {name: self.data.truth(name) for name, _ in validation}
        missing = [name for name, path in truths.items() if path is None]
        if missing:
            raise SinganInsertError(
                f"No validation label for {missing[:3]} in {self.data.root / self.data.truth_dir}: "
                "scoring needs <name>_Label.nii.gz for every validation scan.")
        results: dict[str, dict[str, list[float]]] = {}
        per_case: dict[str, list[dict[str, Any]]] = {}
        for method in methods:
            _check_method(method)
            rows = []
            for name, _ in validation:
                prediction_path = self.prediction(method, name)
                if not prediction_path.is_file():
                    raise SinganInsertError(f"{prediction_path} is missing: run step 6 for {method!r}.")
                prediction, _ = read_volume(prediction_path)
                truth, truth_affine = read_volume(truths[name])
                scores = segmentation_scores(prediction, truth, spacing_from_affine(truth_affine),
                                             label=TUMOR_LABEL)
                rows.append({"case": name, "dice": scores["dice"], "assd": scores["assd"]})
            per_case[method] = rows
            results[METHOD_TITLES[method]] = {"dice": [r["dice"] for r in rows],
                                              "assd": [r["assd"] for r in rows]}
        results.update(extra or {})
        table = table1_report(results, metrics=["dice", "assd"], file=None)
        report = {"table": table, "per_case": per_case, "settings": self.settings.to_dict()}
        if write:
            folder = self.work / "evaluation"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "table1.md").write_text(table["markdown"] + "\n")
            (folder / "table1.json").write_text(json.dumps(report, indent=2))
        return report

    def segmentation_figure(self, path: str | os.PathLike, methods: Sequence[str] = METHODS,
                            cases: Sequence[str] | None = None) -> Path:
        """A Fig.-3-style grid: per validation case, hrT2 with the truth, then each method's
        translation with its prediction (red contours), through the slice of largest tumor area.

        Args:
            path: the PNG to write.
            methods: methods to show (their predictions must exist).
            cases: validation cases (rows); default the first four, in name order.
        """
        from singan_insert.evaluation.figures import figure_grid

        names = list(cases) if cases is not None else [n for n, _ in self.data.validation_images()][:4]
        rows, contours = [], []
        for name in names:
            hrt2, grid_affine = read_volume(self.grid_validation(name))
            truth_path = self.data.truth(name)
            truth = None
            if truth_path is not None:
                native, native_affine = read_volume(truth_path)
                truth = resample_labels(native == TUMOR_LABEL, native_affine, grid_affine, hrt2.shape) > 0
            predictions = [read_volume(case_path(self.work / "predictions_grid" / m, name, SOURCE_MODALITY))[0] == TUMOR_LABEL
                           for m in methods]
            reference = truth if truth is not None and truth.any() else predictions[0]
            areas = reference.sum(axis=(0, 1))
            k = int(np.argmax(areas)) if areas.any() else hrt2.shape[_SLICE_AXIS] // 2
            images = [hrt2] + [read_volume(self.translated(m, name))[0] for m in methods]
            rows.append([_display(image[:, :, k]) for image in images])
            contours.append([None if truth is None else truth[:, :, k]] + [p[:, :, k] for p in predictions])
        titles = ["hrT2 + truth"] + [METHOD_TITLES[m].split(":")[0] + " (A + S_A)" for m in methods]
        return figure_grid(rows, path, titles, row_titles=names, contours=contours,
                           window=[(0.0, 1.0)] * len(rows))

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _require(path: Path, what: str, script: str) -> None:
        if not path.is_file():
            raise SinganInsertError(f"The {what} model {path} does not exist yet: run {script} first.")


def _display(image: np.ndarray) -> np.ndarray:
    """A slice mapped to [0, 1] by its 1st and 99th percentiles (for side-by-side panels)."""
    low, high = np.percentile(image, (1, 99))
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise SinganInsertError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")


def _torch_device(name: str) -> str:
    """``name`` resolved by the package's one resolver (``"auto"``: CUDA when available)."""
    return str(select_device(name))


def _nnunet_device(name: str) -> str:
    """nnU-Net takes a device type: ``"cuda"`` or ``"cpu"``."""
    return "cuda" if _torch_device(name).startswith("cuda") else "cpu"
