"""A contrast factor given with the automatic appearance would be ignored: every layer says so.

With ``appearance="auto"`` (the default) the model chooses each tumor's level itself; a user
who passes GBA's contrast factors there must hear that they do nothing, not train on the
model's choice believing it was theirs.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from singan_insert.batch import InsertSettings
from singan_insert.errors import SinganInsertError
from singan_insert.insertion.insert import InsertionParameters, insert_tumor
from singan_insert.insertion.placement import Placement, SourceTumor
from singan_insert.insertion.sampling import check_contrast_applies
from singan_insert.pipeline.settings import PipelineSettings

NO_EFFECT = "has no effect with appearance 'auto'"
SHAPE = (40, 40, 16)
AFFINE = np.diag([0.5, 0.5, 1.5, 1.0])


def volume(seed: int, tumor: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = (100 + 20 * rng.normal(size=SHAPE)).astype(np.float32)
    grids = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    mask = (sum(((g - c) / r) ** 2 for g, c, r in zip(grids, (20, 20, 8), (6, 5, 3))) <= 1) & tumor
    image[mask] = 160
    return image, mask.astype(np.uint8)


@pytest.fixture(scope="module")
def source():
    image, label = volume(3, tumor=True)
    return SourceTumor.from_arrays(image, label, AFFINE, label_value=1)


@pytest.mark.parametrize("contrast", [0.5, (0.5, 0.8), {0.5, 0.8, 1.5}, ["0.5:1.5"]])
def test_a_contrast_with_the_automatic_appearance_is_refused_and_says_what_to_do(contrast):
    with pytest.raises(SinganInsertError, match=NO_EFFECT) as error:
        check_contrast_applies(contrast, "auto")
    assert "appearance='fixed'" in str(error.value) and "leave contrast out" in str(error.value)
    check_contrast_applies(contrast, "fixed")  # the paper's method uses it


@pytest.mark.parametrize("contrast", [None, 1.0, {1.0}, ["1.0"]])
def test_not_choosing_a_contrast_passes(contrast):
    check_contrast_applies(contrast, "auto")


def test_the_torchio_transforms_refuse_it(tiny_model_file, source):
    from singan_insert.integrations.torchio import RandomTumorInsertion, TumorInsertion

    with pytest.raises(SinganInsertError, match=NO_EFFECT):
        TumorInsertion(tiny_model_file, source, (20, 20, 8), contrast=0.8)
    with pytest.raises(SinganInsertError, match=NO_EFFECT):
        RandomTumorInsertion(tiny_model_file, [source], contrast=(0.5, 0.8))
    assert TumorInsertion(tiny_model_file, source, (20, 20, 8), contrast=0.8, appearance="fixed").contrast == 0.8
    RandomTumorInsertion(tiny_model_file, [source], contrast=(0.5, 0.8), appearance="fixed")
    RandomTumorInsertion(tiny_model_file, [source])


def test_monai_and_nnunet_refuse_it(tiny_model_file, source):
    pytest.importorskip("monai")
    from singan_insert.integrations.monai import RandTumorInsertiond
    from singan_insert.integrations.nnunet import OnlineInsertionSettings

    with pytest.raises(SinganInsertError, match=NO_EFFECT):
        RandTumorInsertiond("image", tiny_model_file, [source], contrast=(0.5, 0.8))
    with pytest.raises(SinganInsertError, match=NO_EFFECT):  # lambda carried by the fixed part
        RandTumorInsertiond("image", tiny_model_file, [source], parameters=InsertionParameters(contrast=0.5))
    RandTumorInsertiond("image", tiny_model_file, [source], contrast=(0.5, 0.8),
                        parameters=InsertionParameters(appearance="fixed"))
    with pytest.raises(SinganInsertError, match=NO_EFFECT):
        OnlineInsertionSettings(model=tiny_model_file, contrast=(0.5, 0.8))
    OnlineInsertionSettings(model=tiny_model_file, contrast=(0.5, 0.8), appearance="fixed")


def test_the_batch_settings_the_command_line_and_the_pipeline_refuse_it(tmp_path):
    with pytest.raises(SinganInsertError, match="--appearance fixed"):
        InsertSettings(contrast=["0.5", "0.8", "1.5"])
    InsertSettings(contrast=["0.5", "0.8", "1.5"], appearance="fixed")
    completed = subprocess.run(
        [sys.executable, "-m", "singan_insert", "insert", "--model", str(tmp_path / "missing"),
         "--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--contrast", "0.5", "0.8"],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and NO_EFFECT in completed.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(SinganInsertError, match=NO_EFFECT):
        PipelineSettings(contrast=(0.5, 0.8))
    PipelineSettings(contrast=(0.5, 0.8), appearance="fixed")
    PipelineSettings()  # its default lambda is the paper's, for appearance="fixed"


def test_insert_tumor_warns_and_the_fixed_appearance_uses_it(tiny_harmonizer, source):
    target = volume(4)[0]
    placement = Placement(location=(20, 21, 8))
    with pytest.warns(UserWarning, match="contrast=0.5 has no effect"):
        ignored = insert_tumor(target, AFFINE, source, tiny_harmonizer,
                               InsertionParameters(placement=placement, contrast=0.5, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        chosen = insert_tumor(target, AFFINE, source, tiny_harmonizer,
                              InsertionParameters(placement=placement, seed=0))
        dimmed = insert_tumor(target, AFFINE, source, tiny_harmonizer,
                              InsertionParameters(placement=placement, seed=0, appearance="fixed", contrast=0.5))
    np.testing.assert_array_equal(ignored.image, chosen.image)  # what the warning says
    tumor = chosen.label > 0
    assert not np.allclose(dimmed.image[tumor], chosen.image[tumor])
