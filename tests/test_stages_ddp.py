"""CycleGAN and pix2pix under torchrun: 2 CPU processes, gloo, DistributedDataParallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist

from singan_insert.harmonizer.model_file import load_tensors
from singan_insert.stages._training import CHECKPOINT_NAME
from singan_insert.stages.cyclegan import CycleGAN, CycleGANConfig
from singan_insert.stages.pix2pix import Pix2Pix, Pix2PixConfig
from singan_insert.stages.slices import PairedSliceDataset, SliceDataset

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

AFFINE = np.diag([0.5, 0.5, 1.5, 1.0])

# Every rank trains, then writes the weights it ended with to a file of its own.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch

    from singan_insert.stages.cyclegan import CycleGANConfig, train_cyclegan
    from singan_insert.stages.pix2pix import Pix2PixConfig, train_pix2pix

    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    settings = json.loads((root / "settings.json").read_text())
    rank = os.environ["RANK"]
    pairs = [(root / f"bprime{i}.nii.gz", root / f"a{i}.nii.gz") for i in range(2)]

    config = Pix2PixConfig.from_dict(settings["pix2pix"])
    model = train_pix2pix(pairs, root / "pix2pix", config)
    model.save(root / f"pix2pix-rank{rank}.safetensors")

    config = CycleGANConfig.from_dict(settings["cyclegan"])
    model = train_cyclegan(root / "A", root / "B", root / "cyclegan", config)
    model.save(root / f"cyclegan-rank{rank}.safetensors")
    # The same run, interrupted and resumed by the same processes: each rank's image pool
    # and random generator must come back from the checkpoint.
    train_cyclegan(root / "A", root / "B", root / "cyclegan-split", config, stop_at=7)
    model = train_cyclegan(root / "A", root / "B", root / "cyclegan-split", config)
    model.save(root / f"cyclegan-split-rank{rank}.safetensors")
    """
)


def disks(seed: int, count: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    masks = []
    for _ in range(count):
        cx, cy, r = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.2, 0.5)
        masks.append(((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(np.float32))
    return np.stack(masks, axis=2)


def write_data(root) -> None:
    """Two (B', A) pairs of 32 px volumes, and unpaired A and B folders of 16 px volumes."""
    (root / "A").mkdir()
    (root / "B").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        mask = disks(i, 6)
        a = mask * 100 + rng.normal(0, 3, mask.shape)
        b = 100 - mask * 80 + rng.normal(0, 3, mask.shape)
        nib.save(nib.Nifti1Image(a.astype(np.float32), AFFINE), root / f"a{i}.nii.gz")
        nib.save(nib.Nifti1Image(b.astype(np.float32), AFFINE), root / f"bprime{i}.nii.gz")
        small = disks(10 + i, 6, size=16)
        nib.save(nib.Nifti1Image((small * 100).astype(np.float32), AFFINE), root / "A" / f"a{i}.nii.gz")
        nib.save(nib.Nifti1Image((100 - small * 80).astype(np.float32), AFFINE), root / "B" / f"b{i}.nii.gz")


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_two_gloo_processes_train_in_lockstep(tmp_path):
    write_data(tmp_path)
    pix2pix_config = Pix2PixConfig.preset(
        "tiny", iterations=20, decay_iterations=10, batch_size=2, learning_rate=1e-3, checkpoint_every=100
    )
    cyclegan_config = CycleGANConfig.preset(
        "tiny", iterations=8, decay_iterations=8, learning_rate=1e-3, checkpoint_every=3
    )
    (tmp_path / "settings.json").write_text(
        json.dumps({"pix2pix": pix2pix_config.to_dict(), "cyclegan": cyclegan_config.to_dict()})
    )
    (tmp_path / "train.py").write_text(SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(tmp_path / "train.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    for stage, cls in (("pix2pix", Pix2Pix), ("cyclegan", CycleGAN), ("cyclegan-split", CycleGAN)):
        rank0 = cls.load(tmp_path / f"{stage}-rank0.safetensors")
        rank1 = cls.load(tmp_path / f"{stage}-rank1.safetensors")
        assert same_weights(rank0, rank1), f"{stage}: the ranks diverged"
        assert same_weights(rank0, cls.load(tmp_path / stage / f"{stage.split('-')[0]}.safetensors"))
        assert rank0.info["iterations_done"] == rank0.config.total_iterations

    # A distributed run interrupted and resumed ends where the uninterrupted one does.
    straight = CycleGAN.load(tmp_path / "cyclegan-rank0.safetensors")
    assert same_weights(straight, CycleGAN.load(tmp_path / "cyclegan-split-rank0.safetensors"))

    # The checkpoint holds each rank's own random state and image pools: the ranks drew
    # different noise and saw different images.
    tensors, meta = load_tensors(tmp_path / "cyclegan" / CHECKPOINT_NAME, "singan-insert-cyclegan-checkpoint")
    assert meta["world_size"] == 2 and meta["step"] == cyclegan_config.total_iterations
    for name in ("pool_a.rng", "pool_a.images", "torch_rng"):
        assert not torch.equal(tensors[f"rank0.{name}"], tensors[f"rank1.{name}"]), name

    # Training made progress: errors against each run's initial state. (How well the stages
    # learn is tested in one process, in test_stages_pix2pix.py and test_stages_cyclegan.py.)
    data = PairedSliceDataset(
        [(tmp_path / f"bprime{i}.nii.gz", tmp_path / f"a{i}.nii.gz") for i in range(2)], size=32
    )

    def pixel_error(model: Pix2Pix) -> float:
        with torch.inference_mode():
            return float((model.generator.eval()(data.sources) - data.targets).abs().mean())

    trained = Pix2Pix.load(tmp_path / "pix2pix-rank0.safetensors")
    assert pixel_error(trained) < pixel_error(Pix2Pix(pix2pix_config))

    domain_a, domain_b = SliceDataset(tmp_path / "A", size=16), SliceDataset(tmp_path / "B", size=16)

    def cycle_error(model: CycleGAN) -> float:
        with torch.inference_mode():
            a, b = domain_a.slices, domain_b.slices
            return float(
                (model.generator_ba(model.generator_ab(a)) - a).abs().mean()
                + (model.generator_ab(model.generator_ba(b)) - b).abs().mean()
            )

    assert cycle_error(straight) < cycle_error(CycleGAN(cyclegan_config).eval())
