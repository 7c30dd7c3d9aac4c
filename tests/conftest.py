"""Shared fixtures: small deterministic images and a harmonizer trained in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import textured_slice

from singan_insert import TrainingConfig, train_harmonizer


# The test tensors are small: one thread is as fast as two and immune to oversubscription
# when other processes share the cores (parallel DataLoader workers, a busy CI machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Output folder of a 'tiny' training run (about 2 s)."""
    out = tmp_path_factory.mktemp("tiny_model")
    train_harmonizer(textured_slice(), TrainingConfig.preset("tiny"), out_dir=out, seed=0,
                     spacing=(0.5, 0.5), progress=False, provenance={"axis": 2, "modality": "hrT2"})
    return out


@pytest.fixture(scope="session")
def tiny_harmonizer(tiny_model_dir):
    from singan_insert import Harmonizer

    return Harmonizer.load(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_model_file(tiny_model_dir) -> str:
    """The tiny model's file, as the transforms take it (a path string)."""
    return str(tiny_model_dir / "harmonizer.safetensors")
