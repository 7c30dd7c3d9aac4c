"""nnU-Net v2 training with harmonized tumors inserted on the fly (a complete, small run).

    python examples/nnunet_online/train_online.py --work work_online            # simulated data
    python examples/nnunet_online/train_online.py --work w --sources cross-modal --trainer short

Steps: (1) a simulated dataset of labelled hrT2-like volumes, most of them WITHOUT a tumor, and
(for ``--sources cross-modal``) a folder of ceT1-like source cases; (2) a harmonizer trained on
ONE hrT2 slice; (3) export to nnU-Net's raw format, plan and preprocess; (4) the on-the-fly
insertion settings next to the preprocessed dataset; (5) nnU-Net training with
``nnUNetTrainerTumorInsertion_Smoke`` (or ``_Short``). The training log
(``<work>/nnunet/logs/train_fold0.log``) says how many patches that reached the network held an
inserted tumor. About 6 minutes with the smoke trainer on a busy 2-core machine (load 8).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from singan_insert import TrainingConfig, train_harmonizer
from singan_insert.datasets.phantom import simulate_subject, write_crossmoda
from singan_insert.evaluation.experiments import training_slice_from_subject
from singan_insert.integrations.nnunet import OnlineInsertionSettings, write_online_settings
from singan_insert.stages.nnunet import NnUNetCase, NnUNetWorkspace

TRAINERS = {"smoke": "nnUNetTrainerTumorInsertion_Smoke", "short": "nnUNetTrainerTumorInsertion_Short",
            "full": "nnUNetTrainerTumorInsertion"}


def simulate(work: Path, cases: int, shape) -> list[NnUNetCase]:
    """hrT2-like volumes with their labels; only every third one keeps its tumor."""
    out = []
    for index in range(cases):
        subject = simulate_subject(index, shape=shape)
        label = subject.label_b.copy()
        image = subject.image_b
        if index % 3:  # a case without a tumor (it gets one only by insertion)
            label[label == 1] = 0
            image = subject.render_b_washed_out()
        folder = work / "hrT2_cases"
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, subject.affine_b), folder / f"case{index}_hrT2.nii.gz")
        nib.save(nib.Nifti1Image(label, subject.affine_b), folder / f"case{index}_Label.nii.gz")
        out.append(NnUNetCase(f"case{index}", (folder / f"case{index}_hrT2.nii.gz",),
                              folder / f"case{index}_Label.nii.gz"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="working folder")
    parser.add_argument("--sources", choices=["training", "cross-modal"], default="training",
                        help="tumors from the training split (TumorCP-style) or from ceT1 cases")
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="smoke")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--probability", type=float, default=0.8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    shape = (64, 64, 32)

    cases = simulate(work, args.cases, shape)
    slice_b, spacing, _ = training_slice_from_subject(simulate_subject(100, shape=shape))
    model = work / "harmonizer"
    if not (model / "harmonizer.safetensors").is_file():
        train_harmonizer(slice_b, TrainingConfig.preset("tiny"), out_dir=model, spacing=spacing,
                         progress=False, provenance={"axis": 2, "modality": "hrT2"})
    sources = "training"
    if args.sources == "cross-modal":
        for index in range(3):
            write_crossmoda(simulate_subject(200 + index, shape=shape), work / "ceT1_sources", f"src{index}")
        sources = str(work / "ceT1_sources")

    ws = NnUNetWorkspace(work / "nnunet", num_processes_augmentation=1)
    dataset = ws.export_dataset(510, "OnlineInsertion", cases)
    ws.plan_and_preprocess(dataset, ("3d_fullres",))
    write_online_settings(ws.preprocessed / dataset.folder_name, OnlineInsertionSettings(
        model=str(model / "harmonizer.safetensors"), probability=args.probability, sources=sources,
        degrees=10.0))
    trainer = f"singan_insert.integrations.nnunet.{TRAINERS[args.trainer]}"
    fold = ws.train(dataset, "3d_fullres", 0, trainer=trainer, device=args.device, validate=False)
    log = (ws.logs / "train_fold0.log").read_text()
    for line in re.findall(r"singan-insert: .*", log):
        print(line[:300])
    print(f"model: {fold}")


if __name__ == "__main__":
    main()
