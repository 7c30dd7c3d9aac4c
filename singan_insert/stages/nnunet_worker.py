"""The child process of :class:`~singan_insert.stages.nnunet.NnUNetWorkspace`: train or predict.

``python -m singan_insert.stages.nnunet_worker SPEC.json`` runs one step, described by the JSON
file the parent wrote (``action``: ``"train"`` or ``"predict"``, and its arguments), in the
environment the parent gave it (nnU-Net's three folders, process counts); the parent keeps the
log and reports failures. The parent never imports ``nnunetv2``; this module does, in the child
only, so the parent stays importable without the extra.

Trainers are constructed directly, not looked up by name (:func:`resolve_trainer`):
nnU-Net's ``recursive_find_trainer_class_by_name`` imports every trainer module, which fails
beside a CPU-only torch (see :mod:`singan_insert.stages.nnunet`). Checkpoints are read for
prediction with ``torch.load(weights_only=True)`` (:func:`load_checkpoint_safely`), so a
foreign ``.pth`` cannot execute code.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["load_checkpoint_safely", "main", "predict", "resolve_trainer", "train"]


def resolve_trainer(name: str):
    """The trainer class for ``name``, importing as little of nnU-Net as possible (see the module docstring)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if name == "nnUNetTrainer":
        return nnUNetTrainer
    if name.startswith("nnUNetTrainer_SinganInsert"):
        from singan_insert.stages.nnunet_trainers import SHIPPED_TRAINERS

        if name in SHIPPED_TRAINERS:
            return SHIPPED_TRAINERS[name]
    if name.startswith("nnUNetTrainerTumorInsertion"):  # on-the-fly insertion (integrations/nnunet)
        from singan_insert.integrations import nnunet as online

        if hasattr(online, name):
            return getattr(online, name)
    if "." in name:
        module_name, class_name = name.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is None:
            raise RuntimeError(f"Module {module_name!r} has no class {class_name!r}.")
    else:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        try:
            cls = recursive_find_trainer_class_by_name(name)
        except Exception as error:
            if "torchvision" in str(error) or "timm" in str(error):
                raise RuntimeError(
                    f"nnU-Net's by-name lookup of trainer {name!r} imports every trainer module, "
                    f"and one of them needs torchvision, which failed to import ({error}). Pass "
                    f"the trainer as a dotted path 'package.module.{name}', use a shipped "
                    "trainer, or install a matching torch/torchvision pair."
                ) from error
            raise
    if not (isinstance(cls, type) and issubclass(cls, nnUNetTrainer)):
        raise RuntimeError(f"{name!r} is not a subclass of nnUNetTrainer.")
    return cls


def train(spec: dict[str, Any]) -> None:
    import torch
    from nnunetv2.run.run_training import maybe_load_checkpoint

    trainer_class = resolve_trainer(spec["trainer"])
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / spec["dataset"]
    plans = json.loads((preprocessed / f"{spec['plans']}.json").read_text())
    plans["continue_training"] = spec["continue_training"]  # read (and popped) by nnU-Net >= 2.6
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = trainer_class(
        plans=plans,
        configuration=spec["configuration"],
        fold=spec["fold"],
        dataset_json=dataset_json,
        device=torch.device(spec["device"]),
    )
    # Read by run_training()/initialize(), so setting them after construction takes effect.
    for attribute, value in spec["overrides"].items():
        setattr(trainer, attribute, value)
    maybe_load_checkpoint(trainer, spec["continue_training"], False, None)
    trainer.run_training()
    if spec["validate"]:
        trainer.perform_actual_validation(False)


def load_checkpoint_safely(path: Path) -> dict:
    """``torch.load`` restricted to tensors and plain containers (numpy scalars allowed)."""
    import torch

    numpy_globals = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32))]
    try:
        numpy_globals.append(np._core.multiarray.scalar)  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        numpy_globals.append(np.core.multiarray.scalar)
    with torch.serialization.safe_globals(numpy_globals):
        return torch.load(path, map_location="cpu", weights_only=True)


def predict(spec: dict[str, Any]) -> None:
    import inspect

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model = Path(spec["model_folder"])
    dataset_json = json.loads((model / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((model / "plans.json").read_text()))
    parameters, trainer_name, configuration, mirroring_axes = [], None, None, None
    for fold in spec["folds"]:
        checkpoint = load_checkpoint_safely(model / f"fold_{fold}" / spec["checkpoint"])
        if trainer_name is None:
            trainer_name = checkpoint["trainer_name"]
            configuration = checkpoint["init_args"]["configuration"]
            mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes")
        parameters.append(checkpoint["network_weights"])
    configuration_manager = plans_manager.get_configuration(configuration)
    n_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    trainer_class = resolve_trainer(trainer_name)
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        network = trainer_class.build_network_architecture(
            plans_manager, configuration_manager, n_inputs, n_outputs,
            enable_deep_supervision=False,
        )  # fmt: skip
    else:  # nnU-Net < 2.6 signature
        network = trainer_class.build_network_architecture(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            n_inputs, n_outputs, enable_deep_supervision=False,
        )  # fmt: skip
    network.load_state_dict(parameters[0])
    device = torch.device(spec["device"])
    predictor = nnUNetPredictor(
        tile_step_size=spec["tile_step_size"],
        use_gaussian=True,
        use_mirroring=spec["use_mirroring"],
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network, plans_manager, configuration_manager, parameters, dataset_json, trainer_name,
        mirroring_axes,
    )  # fmt: skip
    if hasattr(predictor, "predict_from_files_sequential"):  # no worker processes at all
        predictor.predict_from_files_sequential(
            spec["inputs"], spec["outputs"], save_probabilities=False, overwrite=True
        )
    else:  # pragma: no cover - older nnU-Net
        n = int(os.environ.get("nnUNet_def_n_proc", "1"))
        predictor.predict_from_files(
            spec["inputs"], spec["outputs"], save_probabilities=False, overwrite=True,
            num_processes_preprocessing=n, num_processes_segmentation_export=n,
        )  # fmt: skip


def main(argv: Sequence[str]) -> None:
    """Child-process entry: ``python -m singan_insert.stages.nnunet_worker SPEC.json``."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m singan_insert.stages.nnunet_worker SPEC.json (internal)")
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("torch_threads"):
        import torch

        torch.set_num_threads(int(spec["torch_threads"]))
    actions = {"train": train, "predict": predict}
    if spec.get("action") not in actions:
        raise SystemExit(f"unknown action {spec.get('action')!r}")
    actions[spec["action"]](spec)


if __name__ == "__main__":
    main(sys.argv[1:])
