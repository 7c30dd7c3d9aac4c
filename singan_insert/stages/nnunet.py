"""nnU-Net v2 as a stage of the method: export, plan and preprocess, train, predict.

The paper segments with nnU-Net: S_A is trained on the labelled source modality (ceT1) and
later applied to translated target images. This module drives the real ``nnunetv2`` package
(optional extra: ``pip install 'singan-insert[nnunet]'``) from a :class:`NnUNetWorkspace`,
a folder that holds nnU-Net's three trees::

    <root>/nnUNet_raw/Dataset501_VS/{dataset.json, imagesTr/, labelsTr/, imagesTs/}
    <root>/nnUNet_preprocessed/Dataset501_VS/...
    <root>/nnUNet_results/Dataset501_VS/<trainer>__<plans>__<configuration>/fold_<f>/...
    <root>/logs/<step>.log

Raw format written by :meth:`NnUNetWorkspace.export_dataset`: channel ``k`` of case ``c`` is
``<c>_<kkkk>.nii.gz`` (``_0000`` for a single channel), its label ``<c>.nii.gz`` with integer
values; ``dataset.json`` declares ``channel_names``, ``labels`` (crossMoDA by default:
background 0, VS 1, cochlea 2), ``numTraining`` and ``file_ending``.

Design decisions, and why:

* **Paths per call, never global.** nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and
  ``nnUNet_results`` from the environment (older releases once, at import time). Every step
  therefore runs in a child process (``sys.executable``, so the same environment; training
  and prediction in :mod:`singan_insert.stages.nnunet_worker`) that gets
  its own environment from :meth:`NnUNetWorkspace.environment`; the caller's ``os.environ``
  is never modified, and two workspaces can be used from one program. The child process also
  confines nnU-Net's worker processes, memory and output (kept in ``logs/``).
* **CPU-safe process counts.** ``nnUNet_def_n_proc`` (preprocessing, export) and
  ``nnUNet_n_proc_DA`` (data-augmentation workers) default to 1, ``-np``/``-npfp`` to 1, torch
  to 1 thread, and ``nnUNet_compile`` is off; nnU-Net's own defaults (8 and 12 processes,
  all cores) swamp a small machine.
* **Trainers are constructed directly, not looked up by name.** nnU-Net's
  ``recursive_find_trainer_class_by_name`` imports every module under
  ``nnunetv2.training.nnUNetTrainer`` until it finds the name; that includes the Primus
  trainers, which import ``timm`` and through it ``torchvision``. On a machine whose torch is
  a local CPU build (here torch 2.13.0+cpu), the only torchvision pip can pair with it is
  PyPI's, built against PyPI's (CUDA) torch, and importing it fails with ``operator
  torchvision::nms does not exist`` -- so ``nnUNetv2_train -tr <anything but nnUNetTrainer>``
  and ``nnUNetv2_predict`` with such a trainer crash. The alternative, the matching pair
  torch 2.14.1 + torchvision 0.29.1 (what a plain ``pip install nnunetv2`` pulls in), is a
  5.5 GB CUDA build that replaces the CPU torch every other part of this package uses. The
  wrapper instead resolves the trainer class itself -- the shipped trainers
  (:mod:`singan_insert.stages.nnunet_trainers`), ``nnUNetTrainer``, or a dotted path
  ``package.module.ClassName`` are imported directly, and only other bare names fall back to
  nnU-Net's lookup -- then builds it exactly as ``nnUNetv2_train`` does (same constructor,
  ``maybe_load_checkpoint``, ``run_training``, ``perform_actual_validation``). Prediction
  builds the network with the trainer's ``build_network_architecture`` and hands it to
  ``nnUNetPredictor.manual_initialization``. This works whether or not torchvision imports,
  so it works unchanged on GPU machines with a healthy torch/torchvision pair.
* **Checkpoints are read without unpickling code.** nnU-Net writes its checkpoints with
  ``torch.save``; prediction reads them with ``torch.load(weights_only=True)`` (tensors and
  plain containers only), so a foreign ``.pth`` cannot execute code.  Continuing a training is
  nnU-Net's own code and reads its own checkpoint in full.

Typical use (a 5-iteration smoke run of a 6-volume dataset takes about a minute on 2 CPU
cores)::

    ws = NnUNetWorkspace("work/nnunet")
    ds = ws.export_dataset(501, "VS", [NnUNetCase("ldn_1", ("ldn_1_ceT1.nii.gz",),
                                                  "ldn_1_Label.nii.gz"), ...])
    ws.plan_and_preprocess(ds)
    ws.train(ds, trainer=SMOKE_TRAINER)
    ws.predict(ds, [NnUNetCase("val_1", ("val_1_hrT2_translated.nii.gz",))], "work/pred",
               trainer=SMOKE_TRAINER)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from singan_insert.errors import MissingExtraError, SinganInsertError

__all__ = [
    "CROSSMODA_LABELS",
    "SMOKE_TRAINER",
    "SHORT_TRAINER",
    "NnUNetCase",
    "NnUNetDataset",
    "NnUNetError",
    "NnUNetWorkspace",
    "nnunet_available",
    "require_nnunet",
]

CROSSMODA_LABELS: Mapping[str, int] = {"background": 0, "VS": 1, "cochlea": 2}
"""crossMoDA's label values: vestibular schwannoma 1, cochleas 2."""

SMOKE_TRAINER = "nnUNetTrainer_SinganInsertSmoke"
"""Shipped trainer: 1 epoch of 5 iterations (see :mod:`singan_insert.stages.nnunet_trainers`)."""

SHORT_TRAINER = "nnUNetTrainer_SinganInsertShort"
"""Shipped trainer: 20 epochs of 25 iterations."""

FILE_ENDING = ".nii.gz"
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_LOG_TAIL_LINES = 40


class NnUNetError(RuntimeError):
    """An nnU-Net step failed; the message holds the end of its log and the log's path."""


def nnunet_available() -> bool:
    """Whether the optional package ``nnunetv2`` can be imported (without importing it)."""
    return importlib.util.find_spec("nnunetv2") is not None


def require_nnunet(feature: str) -> None:
    """Raise :class:`~singan_insert.errors.MissingExtraError` if ``nnunetv2`` is missing."""
    if not nnunet_available():
        raise MissingExtraError("nnunetv2", "nnunet", feature)


@dataclass(frozen=True)
class NnUNetCase:
    """One case: its channel images (in channel order) and, for training, its label map.

    Args:
        identifier: case name, letters/digits/``_``/``-`` (e.g. ``"crossmoda2021_ldn_1"``);
            nnU-Net appends ``_0000`` etc. for channels, so it must not carry that suffix.
        images: one NIfTI file (``.nii`` or ``.nii.gz``) per channel, all of one grid.
        label: integer label map on the same grid (training cases only).
    """

    identifier: str
    images: tuple[Path, ...]
    label: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.images, (str, os.PathLike)):
            object.__setattr__(self, "images", (self.images,))
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        if self.label is not None:
            object.__setattr__(self, "label", Path(self.label))
        if not _IDENTIFIER.match(self.identifier) or re.search(r"_\d{4}$", self.identifier):
            raise SinganInsertError(
                f"Case identifier {self.identifier!r} is not usable by nnU-Net: use letters, "
                "digits, '_' and '-', starting with a letter or digit, and no trailing '_NNNN' "
                "(nnU-Net reserves it for channel numbers)."
            )
        if not self.images:
            raise SinganInsertError(f"Case {self.identifier!r} has no image file.")


@dataclass(frozen=True)
class NnUNetDataset:
    """An exported dataset: nnU-Net's id (1-999) and name, e.g. ``Dataset501_VS``."""

    dataset_id: int
    name: str
    labels: Mapping[str, int] = field(default_factory=lambda: dict(CROSSMODA_LABELS))
    channel_names: tuple[str, ...] = ("hrT2",)

    def __post_init__(self) -> None:
        if not isinstance(self.dataset_id, int) or not 1 <= self.dataset_id <= 999:
            raise SinganInsertError(
                f"nnU-Net dataset ids are integers in [1, 999], got {self.dataset_id!r}. "
                "Ids 1-500 are nnU-Net's own convention for public datasets; 501+ is safe."
            )
        if not _DATASET_NAME.match(self.name):
            raise SinganInsertError(
                f"Dataset name {self.name!r} must use letters, digits, '_' and '-' only."
            )

    @property
    def folder_name(self) -> str:
        """nnU-Net's folder name, ``Dataset<ID:03d>_<name>``."""
        return f"Dataset{self.dataset_id:03d}_{self.name}"


class NnUNetWorkspace:
    """A folder holding nnU-Net's raw, preprocessed and results trees, and the steps on them.

    Args:
        root: the workspace folder (created when needed).
        raw, preprocessed, results: override the three trees (default: ``root/nnUNet_raw``,
            ``root/nnUNet_preprocessed``, ``root/nnUNet_results``), e.g. to reuse an
            existing ``nnUNet_raw``.
        num_processes: nnU-Net's worker processes for fingerprinting, preprocessing and
            export (``nnUNet_def_n_proc``, ``-np``, ``-npfp``); >= 1.
        num_processes_augmentation: data-augmentation workers during training
            (``nnUNet_n_proc_DA``); 0 runs augmentation in the training process.
        torch_threads: intra-op threads of the training/prediction process (None: torch's
            default, all cores). 1 by default: on a small, busy CPU more threads wait on each
            other (measured on 2 loaded cores: a smoke epoch took 16 s with 1 thread, 26 s
            with 2); raise it on an idle many-core machine without a GPU.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        raw: str | os.PathLike | None = None,
        preprocessed: str | os.PathLike | None = None,
        results: str | os.PathLike | None = None,
        num_processes: int = 1,
        num_processes_augmentation: int = 1,
        torch_threads: int | None = 1,
    ):
        if num_processes < 1:
            raise SinganInsertError(f"num_processes must be >= 1, got {num_processes}.")
        if num_processes_augmentation < 0:
            raise SinganInsertError(
                f"num_processes_augmentation must be >= 0, got {num_processes_augmentation}."
            )
        if torch_threads is not None and torch_threads < 1:
            raise SinganInsertError(f"torch_threads must be >= 1 or None, got {torch_threads}.")
        self.root = Path(root).absolute()
        self.raw = Path(raw).absolute() if raw else self.root / "nnUNet_raw"
        self.preprocessed = (
            Path(preprocessed).absolute() if preprocessed else self.root / "nnUNet_preprocessed"
        )
        self.results = Path(results).absolute() if results else self.root / "nnUNet_results"
        self.logs = self.root / "logs"
        self.num_processes = num_processes
        self.num_processes_augmentation = num_processes_augmentation
        self.torch_threads = torch_threads

    def __repr__(self) -> str:
        return f"NnUNetWorkspace({str(self.root)!r})"

    # ------------------------------------------------------------------ environment
    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment an nnU-Net step of this workspace runs with.

        A copy of ``base`` (default ``os.environ``) with the three nnU-Net paths, the process
        counts and ``nnUNet_compile=false`` set; the caller's environment is not changed.
        """
        env = dict(os.environ if base is None else base)
        env.update(
            nnUNet_raw=str(self.raw),
            nnUNet_preprocessed=str(self.preprocessed),
            nnUNet_results=str(self.results),
            nnUNet_def_n_proc=str(self.num_processes),
            nnUNet_n_proc_DA=str(self.num_processes_augmentation),
            nnUNet_compile="false",
            PYTHONUNBUFFERED="1",
        )
        # The child must import this very package, also when it is run from a source tree.
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        return env

    # ------------------------------------------------------------------ export
    def export_dataset(
        self,
        dataset_id: int,
        name: str,
        training: Sequence[NnUNetCase],
        test: Sequence[NnUNetCase] = (),
        *,
        labels: Mapping[str, int] = CROSSMODA_LABELS,
        channel_names: Sequence[str] = ("hrT2",),
        overwrite: bool = False,
    ) -> NnUNetDataset:
        """Write cases in nnU-Net's raw format under ``raw/Dataset<ID>_<name>``.

        Does not need ``nnunetv2`` (only nibabel), so data can be prepared for another machine.

        Args:
            dataset_id: nnU-Net's dataset id, 1-999.
            name: dataset name (letters, digits, ``_``, ``-``).
            training: labelled cases (each with ``label``), written to ``imagesTr``/``labelsTr``.
            test: unlabelled cases written to ``imagesTs`` (labels, if any, are ignored).
            labels: label name -> value; must contain ``"background": 0`` and consecutive
                values ``0..K`` (nnU-Net's rule); every label file may only use these values.
            channel_names: one name per input channel (e.g. ``("hrT2",)``; ``"CT"`` turns on
                nnU-Net's CT normalisation); each case must have that many images.
            overwrite: replace an existing dataset of that id, and with it what nnU-Net derived
                from it (its preprocessed data, splits and trained models); otherwise an existing
                one is an error.

        Raises:
            SinganInsertError: on a missing file, a missing label, a channel-count, shape or
                affine mismatch between a case's files, undeclared label values, a duplicate
                identifier, or an existing dataset folder (without ``overwrite``).
        """
        import nibabel as nib

        dataset = NnUNetDataset(dataset_id, name, dict(labels), tuple(channel_names))
        label_values = _check_labels(labels)
        if not channel_names:
            raise SinganInsertError("channel_names must name at least one input channel.")
        if not training:
            raise SinganInsertError("An nnU-Net dataset needs at least one training case.")
        _check_unique([*training, *test])
        existing = [p for p in self.raw.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir()]
        if existing and not overwrite:
            raise SinganInsertError(
                f"{existing[0]} already exists. Pass overwrite=True to replace it, or use "
                "another dataset id."
            )
        # What nnU-Net derived from the old cases goes with them: its splits would leave new
        # cases out of training, and its trained model would go on predicting for the new data.
        for tree in (self.raw, self.preprocessed, self.results):
            for folder in tree.glob(f"Dataset{dataset_id:03d}_*"):
                if folder.is_dir():
                    shutil.rmtree(folder)
        folder = self.raw / dataset.folder_name
        for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if test else ()):
            (folder / sub).mkdir(parents=True, exist_ok=True)

        for case in training:
            if case.label is None:
                raise SinganInsertError(
                    f"Training case {case.identifier!r} has no label file; nnU-Net trains on "
                    "labelled cases only (put unlabelled cases in `test`)."
                )
            reference = _write_channels(case, len(channel_names), folder / "imagesTr")
            label_img = _load_nifti(case.label)
            _check_same_grid(case.identifier, reference, label_img, case.label)
            data = np.asanyarray(label_img.dataobj)
            if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
                raise SinganInsertError(
                    f"Label file {case.label} holds non-integer values; a label map must hold "
                    f"the integer values {sorted(label_values)}."
                )
            found = set(np.unique(data).astype(np.int64).tolist())
            if not found <= label_values:
                raise SinganInsertError(
                    f"Label file {case.label} holds values {sorted(found - label_values)} that "
                    f"are not declared in labels={dict(labels)}. Declare them or fix the file."
                )
            out = nib.Nifti1Image(data.astype(np.uint8), label_img.affine, label_img.header)
            out.set_data_dtype(np.uint8)
            nib.save(out, folder / "labelsTr" / f"{case.identifier}{FILE_ENDING}")
        for case in test:
            _write_channels(case, len(channel_names), folder / "imagesTs")

        description = {
            "channel_names": {str(i): n for i, n in enumerate(channel_names)},
            "labels": {n: int(v) for n, v in labels.items()},
            "numTraining": len(training),
            "file_ending": FILE_ENDING,
            "name": name,
            "description": "Exported by singan-insert",
        }
        (folder / "dataset.json").write_text(json.dumps(description, indent=2))
        return dataset

    # ------------------------------------------------------------------ plan + preprocess
    def plan_and_preprocess(
        self,
        dataset: NnUNetDataset | int,
        configurations: Sequence[str] = ("3d_fullres",),
        *,
        verify_integrity: bool = True,
        planner: str = "ExperimentPlanner",
        gpu_memory_target_gb: float | None = None,
        verbose: bool = False,
        timeout: float | None = None,
    ) -> Path:
        """Fingerprint, plan and preprocess with nnU-Net's ``nnUNetv2_plan_and_preprocess``.

        Args:
            dataset: the exported dataset or its id.
            configurations: nnU-Net configurations to preprocess (``"2d"``, ``"3d_fullres"``,
                ``"3d_lowres"``; the latter only exists for large images).
            verify_integrity: run nnU-Net's dataset check first (recommended).
            planner: experiment planner class name (e.g. ``"nnUNetPlannerResEncM"``).
            gpu_memory_target_gb: planner's memory target (None: the planner's default).
            verbose: also stream nnU-Net's output to stdout (it is always logged).
            timeout: seconds before the step is killed (None: no limit).

        Returns:
            the plans file, ``preprocessed/Dataset<ID>_<name>/<plans>.json``.
        """
        require_nnunet("nnU-Net planning and preprocessing")
        if not configurations:
            raise SinganInsertError("Give at least one configuration, e.g. ('3d_fullres',).")
        folder_name = self._dataset_folder_name(dataset, need_raw=True)
        n = str(self.num_processes)
        argv = [
            sys.executable, "-m", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
            "-d", str(_dataset_id(dataset)),
            "-c", *configurations,
            "-np", *([n] * len(configurations)),
            "-npfp", n,
            "-pl", planner,
            "--no_pbar",
        ]  # fmt: skip
        if verify_integrity:
            argv.append("--verify_dataset_integrity")
        if gpu_memory_target_gb is not None:
            argv += ["-gpu_memory_target", str(gpu_memory_target_gb)]
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0.
        planning_env = {"nnUNet_n_proc_DA": str(max(1, self.num_processes_augmentation))}
        self._run("plan_and_preprocess", argv, verbose=verbose, timeout=timeout,
                  extra_env=planning_env)
        plans = sorted((self.preprocessed / folder_name).glob("*Plans*.json"))
        if not plans:
            raise NnUNetError(
                f"nnU-Net finished but wrote no plans file under {self.preprocessed / folder_name}."
            )
        return max(plans, key=lambda p: p.stat().st_mtime)

    # ------------------------------------------------------------------ train
    def train(
        self,
        dataset: NnUNetDataset | int,
        configuration: str = "3d_fullres",
        fold: int | str = 0,
        *,
        trainer: str = "nnUNetTrainer",
        plans: str = "nnUNetPlans",
        device: str = "cpu",
        continue_training: bool = False,
        validate: bool = True,
        num_epochs: int | None = None,
        iterations_per_epoch: int | None = None,
        val_iterations_per_epoch: int | None = None,
        verbose: bool = False,
        timeout: float | None = None,
    ) -> Path:
        """Train one fold, as ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER``.

        Args:
            dataset: the dataset (planned and preprocessed) or its id.
            configuration: a configuration preprocessed by :meth:`plan_and_preprocess`.
            fold: 0-4 (nnU-Net's 5-fold split of the training cases) or ``"all"``.
            trainer: :data:`SMOKE_TRAINER`, :data:`SHORT_TRAINER`, ``"nnUNetTrainer"``, a
                dotted path ``"package.module.ClassName"`` to an ``nnUNetTrainer`` subclass, or
                another nnU-Net trainer name (found by nnU-Net's lookup, which needs a
                working torchvision; see the module docstring).
            plans: plans identifier (``"nnUNetPlans"``, or a ResEnc planner's plans name).
            device: ``"cpu"``, ``"cuda"`` or ``"mps"``.
            continue_training: resume from the fold's latest checkpoint (nnU-Net's ``--c``).
            validate: run nnU-Net's final validation on the fold's held-out cases afterwards.
            num_epochs, iterations_per_epoch, val_iterations_per_epoch: override the trainer's
                schedule (positive integers; None keeps the trainer's). The result folder is
                still named after ``trainer``.
            verbose: also stream nnU-Net's output to stdout (it is always logged).
            timeout: seconds before the step is killed (None: no limit).

        Returns:
            the fold folder, ``results/Dataset<ID>_<name>/<trainer>__<plans>__<configuration>/``
            ``fold_<f>``, holding ``checkpoint_final.pth``.
        """
        fold = _check_fold(fold)
        require_nnunet("nnU-Net training")
        if device not in ("cpu", "cuda", "mps"):
            raise SinganInsertError(f"device must be 'cpu', 'cuda' or 'mps', got {device!r}.")
        overrides = {
            "num_epochs": num_epochs,
            "num_iterations_per_epoch": iterations_per_epoch,
            "num_val_iterations_per_epoch": val_iterations_per_epoch,
        }
        for key, value in overrides.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SinganInsertError(f"{key} must be a positive integer, got {value!r}.")
        folder_name = self._dataset_folder_name(dataset, need_raw=False)
        plans_file = self.preprocessed / folder_name / f"{plans}.json"
        if not plans_file.is_file():
            raise SinganInsertError(
                f"{plans_file} does not exist: run plan_and_preprocess first (or pass the "
                "plans identifier your planner wrote)."
            )
        spec = {
            "action": "train",
            "dataset": folder_name,
            "configuration": configuration,
            "fold": fold,
            "trainer": trainer,
            "plans": plans,
            "device": device,
            "continue_training": continue_training,
            "validate": validate,
            "overrides": {k: v for k, v in overrides.items() if v is not None},
            "torch_threads": self.torch_threads,
        }
        self._run_worker(f"train_fold{fold}", spec, verbose=verbose, timeout=timeout)
        out = self.model_folder(dataset, trainer, plans, configuration) / f"fold_{fold}"
        if not (out / "checkpoint_final.pth").is_file():
            raise NnUNetError(f"Training finished but {out / 'checkpoint_final.pth'} is missing.")
        return out

    def model_folder(
        self,
        dataset: NnUNetDataset | int,
        trainer: str = "nnUNetTrainer",
        plans: str = "nnUNetPlans",
        configuration: str = "3d_fullres",
    ) -> Path:
        """``results/Dataset<ID>_<name>/<trainer class name>__<plans>__<configuration>``."""
        trainer_name = trainer.rsplit(".", 1)[-1]
        folder_name = self._dataset_folder_name(dataset, need_raw=False)
        return self.results / folder_name / f"{trainer_name}__{plans}__{configuration}"

    # ------------------------------------------------------------------ predict
    def predict(
        self,
        dataset: NnUNetDataset | int,
        cases: Sequence[NnUNetCase] | str | os.PathLike,
        output_folder: str | os.PathLike,
        configuration: str = "3d_fullres",
        folds: Sequence[int | str] = (0,),
        *,
        trainer: str = "nnUNetTrainer",
        plans: str = "nnUNetPlans",
        checkpoint: str = "checkpoint_final.pth",
        device: str = "cpu",
        use_mirroring: bool = True,
        tile_step_size: float = 0.5,
        verbose: bool = False,
        timeout: float | None = None,
    ) -> list[Path]:
        """Segment images with a trained model (the ensemble of ``folds``).

        Args:
            dataset: the dataset the model was trained on, or its id.
            cases: cases to segment (their ``images``, one per channel; labels are ignored),
                or a folder in raw format (``<case>_0000.nii.gz`` ...).
            output_folder: where ``<case>.nii.gz`` label maps are written (created).
            configuration, folds, trainer, plans: which trained model (see :meth:`train`).
            checkpoint: ``"checkpoint_final.pth"`` or ``"checkpoint_best.pth"``.
            device: ``"cpu"``, ``"cuda"`` or ``"mps"``.
            use_mirroring: test-time mirroring (nnU-Net's default; up to 8x slower in 3D).
            tile_step_size: sliding-window step as a fraction of the patch, in (0, 1].
            verbose: also stream nnU-Net's output to stdout (it is always logged).
            timeout: seconds before the step is killed (None: no limit).

        Returns:
            the written label maps, in the order of ``cases`` (sorted by case for a folder).
        """
        require_nnunet("nnU-Net prediction")
        if device not in ("cpu", "cuda", "mps"):
            raise SinganInsertError(f"device must be 'cpu', 'cuda' or 'mps', got {device!r}.")
        if not 0 < tile_step_size <= 1:
            raise SinganInsertError(f"tile_step_size must be in (0, 1], got {tile_step_size}.")
        folds = [_check_fold(f) for f in folds]
        if not folds:
            raise SinganInsertError("Give at least one fold to predict with.")
        model = self.model_folder(dataset, trainer, plans, configuration)
        for f in folds:
            if not (model / f"fold_{f}" / checkpoint).is_file():
                raise SinganInsertError(
                    f"{model / f'fold_{f}' / checkpoint} does not exist: train fold {f} of "
                    f"{model.name} first (or pick the folds and checkpoint you trained)."
                )
        output_folder = Path(output_folder).absolute()
        inputs, identifiers = _prediction_inputs(cases, FILE_ENDING)
        output_folder.mkdir(parents=True, exist_ok=True)
        spec = {
            "action": "predict",
            "model_folder": str(model),
            "folds": folds,
            "checkpoint": checkpoint,
            "inputs": inputs,
            "outputs": [str(output_folder / i) for i in identifiers],
            "device": device,
            "use_mirroring": use_mirroring,
            "tile_step_size": tile_step_size,
            "torch_threads": self.torch_threads,
        }
        self._run_worker("predict", spec, verbose=verbose, timeout=timeout)
        written = [output_folder / f"{i}{FILE_ENDING}" for i in identifiers]
        missing = [p for p in written if not p.is_file()]
        if missing:
            raise NnUNetError(f"nnU-Net did not write {missing[0]} (and {len(missing) - 1} more).")
        return written

    # ------------------------------------------------------------------ internals
    def _dataset_folder_name(self, dataset: NnUNetDataset | int, need_raw: bool) -> str:
        if isinstance(dataset, NnUNetDataset):
            return dataset.folder_name
        dataset_id = _dataset_id(dataset)
        for tree in (self.raw, self.preprocessed, self.results):
            found = sorted(p.name for p in tree.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
            if found and (tree == self.raw or not need_raw):
                return found[0]
        raise SinganInsertError(
            f"No dataset with id {dataset_id} in {self.raw if need_raw else self.root}: "
            "export it first with export_dataset()."
        )

    def _run_worker(self, step: str, spec: dict, *, verbose: bool, timeout: float | None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        spec_file = self.logs / f"{step}.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        argv = [sys.executable, "-m", "singan_insert.stages.nnunet_worker", str(spec_file)]
        self._run(step, argv, verbose=verbose, timeout=timeout)

    def _run(
        self,
        step: str,
        argv: list[str],
        *,
        verbose: bool,
        timeout: float | None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Run ``argv`` with this workspace's environment; log to ``logs/<step>.log``."""
        env = self.environment()
        env.update(extra_env or {})
        for tree in (self.raw, self.preprocessed, self.results, self.logs):
            tree.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{step}.log"
        tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        with open(log_path, "w") as log:
            # A new session, so that a timeout or Ctrl-C also ends nnU-Net's worker processes.
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                start_new_session=True,
            )

            def copy_output() -> None:
                assert process.stdout is not None
                for line in process.stdout:
                    log.write(line)
                    tail.append(line)
                    if verbose:
                        sys.stdout.write(line)
                log.flush()

            reader = threading.Thread(target=copy_output, daemon=True)
            reader.start()
            try:
                returncode = process.wait(timeout=timeout)
            except BaseException:  # timeout, KeyboardInterrupt: do not leave nnU-Net running
                _kill_group(process)
                reader.join(timeout=5)
                if isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                    raise NnUNetError(
                        f"nnU-Net step {step!r} ran past its timeout of {timeout} s and was "
                        f"stopped. Log: {log_path}"
                    ) from None
                raise
            reader.join()
        if returncode != 0:
            last = next((line.strip() for line in reversed(tail) if line.strip()), "")
            raise NnUNetError(
                f"nnU-Net step {step!r} failed (exit code {returncode}): {last}\n"
                f"Last lines of {log_path}:\n" + "".join(tail)
            )


# ---------------------------------------------------------------------- helpers (parent side)
def _dataset_id(dataset: NnUNetDataset | int) -> int:
    if isinstance(dataset, NnUNetDataset):
        return dataset.dataset_id
    if isinstance(dataset, bool) or not isinstance(dataset, (int, np.integer)):
        raise SinganInsertError(f"Give a dataset as NnUNetDataset or integer id, got {dataset!r}.")
    return int(dataset)


def _check_fold(fold: int | str) -> int | str:
    if fold == "all":
        return fold
    if isinstance(fold, (int, np.integer)) and not isinstance(fold, bool) and 0 <= fold <= 4:
        return int(fold)
    raise SinganInsertError(f"fold must be 0-4 or 'all', got {fold!r}.")


def _check_labels(labels: Mapping[str, int]) -> set[int]:
    values = [int(v) for v in labels.values()]
    if labels.get("background") != 0:
        raise SinganInsertError("labels must map 'background' to 0 (nnU-Net requires it).")
    if sorted(values) != list(range(len(values))):
        raise SinganInsertError(
            f"Label values must be consecutive integers 0..K, each used once; got {dict(labels)}."
        )
    return set(values)


def _check_unique(cases: Iterable[NnUNetCase]) -> None:
    seen: set[str] = set()
    for case in cases:
        if case.identifier in seen:
            raise SinganInsertError(f"Case identifier {case.identifier!r} is used twice.")
        seen.add(case.identifier)


def _load_nifti(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise SinganInsertError(f"{path} does not exist.")
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises several types for unreadable files
        raise SinganInsertError(f"{path} is not a readable NIfTI file ({error}).") from error


def _check_same_grid(identifier: str, reference, other, other_path: Path) -> None:
    if reference.shape[:3] != other.shape[:3] or not np.allclose(
        reference.affine, other.affine, atol=1e-4
    ):
        raise SinganInsertError(
            f"Case {identifier!r}: {other_path} is not on the grid of the case's first image "
            f"(shape {other.shape[:3]} vs {reference.shape[:3]}, or a different affine). "
            "nnU-Net needs all files of a case on one grid; resample them first."
        )


def _write_channels(case: NnUNetCase, n_channels: int, folder: Path):
    """Write a case's images as ``<id>_<kkkk>.nii.gz``; return the first image (the grid)."""
    import nibabel as nib

    if len(case.images) != n_channels:
        raise SinganInsertError(
            f"Case {case.identifier!r} has {len(case.images)} image(s) but the dataset declares "
            f"{n_channels} channel(s)."
        )
    reference = None
    for k, path in enumerate(case.images):
        image = _load_nifti(path)
        if len(image.shape) != 3:
            raise SinganInsertError(
                f"{path} has shape {image.shape}; nnU-Net channels are single 3D volumes "
                "(give one file per channel)."
            )
        if reference is None:
            reference = image
        else:
            _check_same_grid(case.identifier, reference, image, path)
        target = folder / f"{case.identifier}_{k:04d}{FILE_ENDING}"
        if path.name.endswith(FILE_ENDING):
            shutil.copyfile(path, target)  # already in the right format: keep it byte for byte
        else:
            nib.save(image, target)
    return reference


def _prediction_inputs(
    cases: Sequence[NnUNetCase] | str | os.PathLike, file_ending: str
) -> tuple[list[list[str]], list[str]]:
    """Lists of channel files and case identifiers, from cases or a raw-format folder."""
    if isinstance(cases, (str, os.PathLike)):
        folder = Path(cases)
        if not folder.is_dir():
            raise SinganInsertError(f"{folder} is not a folder of images to segment.")
        channels: dict[str, list[Path]] = {}
        for path in sorted(folder.glob(f"*_[0-9][0-9][0-9][0-9]{file_ending}")):
            identifier = path.name[: -len(file_ending) - 5]
            channels.setdefault(identifier, []).append(path)
        if not channels:
            raise SinganInsertError(
                f"{folder} holds no '<case>_0000{file_ending}' files to segment."
            )
        cases = [NnUNetCase(i, tuple(p)) for i, p in sorted(channels.items())]
    if not cases:
        raise SinganInsertError("There is nothing to segment: `cases` is empty.")
    _check_unique(cases)
    for case in cases:
        for path in case.images:
            if not path.is_file():
                raise SinganInsertError(f"{path} (case {case.identifier!r}) does not exist.")
    return [[str(p.absolute()) for p in c.images] for c in cases], [c.identifier for c in cases]


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
