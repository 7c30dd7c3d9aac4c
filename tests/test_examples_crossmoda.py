"""The crossMoDA example scripts (examples/crossmoda/0*.py) and singan_insert.pipeline.workflow.

The scripts run in this process (imported by path) on a tiny simulated data set with the
``tiny`` profile: the whole chain 01 -> 07 takes about 20-30 s on two busy cores. nnU-Net is
not in the chain (tests/test_stages_nnunet.py runs it for real); only its missing-extra message
is checked here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from singan_insert.errors import SinganInsertError
from singan_insert.evaluation.metrics import dice
from singan_insert.pipeline import (
    CrossModaData,
    CrossModaPipeline,
    PipelineSettings,
    WorkingGrid,
    resample_image,
    resample_labels,
    simulate_crossmoda,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "examples" / "crossmoda"
STEPS = ["01_train_source_segmenter", "02_cyclegan", "03_train_harmonizer", "04_insert_tumors",
         "05_pix2pix", "06_segment_validation", "07_evaluate"]


def load_script(stem: str):
    spec = importlib.util.spec_from_file_location(f"crossmoda_example_{stem}", SCRIPTS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared; small networks gain nothing from more
    yield
    torch.set_num_threads(threads)


def ball_volume(shape, affine, centre_mm, radius_mm):
    """A ball (label 1) of ``radius_mm`` around ``centre_mm`` on the grid, and an image of it."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    label = (np.linalg.norm(world - centre_mm, axis=-1) <= radius_mm).astype(np.uint8)
    return label, (100.0 + 50.0 * label).astype(np.float32)


# ---------------------------------------------------------------------- working grid
def test_working_grid_is_centred_and_round_trips_a_label():
    rotation = np.array([[np.cos(0.1), -np.sin(0.1), 0], [np.sin(0.1), np.cos(0.1), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.4, 0.4, 1.5])
    affine[:3, 3] = [-20.0, -18.0, -12.0]
    shape = (100, 90, 16)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    label, image = ball_volume(shape, affine, centre + [3.0, -2.0, 1.0], 6.0)

    grid = WorkingGrid((0.8, 0.8, 1.0), (48, 48, None))
    grid_shape, grid_affine = grid.grid_for(shape, affine)
    assert grid_shape == (48, 48, 24)  # z covers the volume's own 24 mm extent
    grid_centre = grid_affine[:3, :3] @ ((np.array(grid_shape) - 1) / 2) + grid_affine[:3, 3]
    np.testing.assert_allclose(grid_centre, centre, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(grid_affine[:3, :3], axis=0), [0.8, 0.8, 1.0])

    on_grid = resample_labels(label, affine, grid_affine, grid_shape)
    back = resample_labels(on_grid, grid_affine, affine, shape)
    assert dice(back, label) > 0.9
    # The ball's volume is kept (mm^3) within the coarser grid's partial-volume error.
    assert abs(on_grid.sum() * 0.64 - label.sum() * 0.24) / (label.sum() * 0.24) < 0.1
    grid_image = resample_image(image, affine, grid_affine, grid_shape)
    assert abs(grid_image[on_grid == 1].mean() - 150.0) < 5.0
    assert abs(np.median(grid_image[on_grid == 0]) - 100.0) < 1.0


def test_resample_labels_rejects_non_integer_maps():
    with pytest.raises(SinganInsertError, match="integers"):
        resample_labels(np.full((4, 4, 4), 0.5), np.eye(4), np.eye(4), (4, 4, 4))


def test_working_grid_and_settings_validate():
    with pytest.raises(SinganInsertError, match="spacing"):
        WorkingGrid((0.8, -1.0, 1.0))
    with pytest.raises(SinganInsertError, match="shape"):
        WorkingGrid(shape=(4, 64, None))
    with pytest.raises(SinganInsertError, match="profile"):
        PipelineSettings.profile("huge")
    with pytest.raises(SinganInsertError, match="contrast"):
        PipelineSettings(contrast=(0.0,))
    settings = PipelineSettings.profile("tiny", seed=3)
    assert PipelineSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert settings.cyclegan_config().image_size is None  # the grid fixes the slice size
    assert settings.harmonizer_config().iterations == 10 and settings.segmenter_config().num_classes == 3


def test_every_stage_gets_its_device_from_the_one_resolver(monkeypatch):
    from singan_insert.pipeline import workflow

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (workflow._torch_device("auto"), workflow._nnunet_device("auto")) == ("cpu", "cpu")
    with pytest.raises(SinganInsertError, match="CUDA was requested"):
        workflow._nnunet_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (workflow._torch_device("auto"), workflow._nnunet_device("auto")) == ("cuda", "cuda")
    assert workflow._nnunet_device("cuda:1") == "cuda"


# ---------------------------------------------------------------------- data discovery
def write_volume(path: Path, data, affine=np.eye(4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def test_crossmoda_discovery_sorts_naturally_and_explains_problems(tmp_path):
    data = CrossModaData(tmp_path)
    with pytest.raises(SinganInsertError, match="source_training"):
        data.source_cases()
    volume = np.zeros((8, 8, 8), np.float32)
    for n in (10, 2):
        write_volume(tmp_path / "source_training" / f"crossmoda2021_ldn_{n}_ceT1.nii.gz", volume)
        write_volume(tmp_path / "source_training" / f"crossmoda2021_ldn_{n}_Label.nii.gz", volume.astype(np.uint8))
    assert [c.name for c in data.source_cases()] == ["crossmoda2021_ldn_2", "crossmoda2021_ldn_10"]
    write_volume(tmp_path / "source_training" / "crossmoda2021_ldn_3_ceT1.nii.gz", volume)
    with pytest.raises(SinganInsertError, match="ldn_3_Label"):
        data.source_cases()
    (tmp_path / "target_training").mkdir()
    with pytest.raises(SinganInsertError, match="_hrT2"):
        data.target_images()
    assert data.truth("crossmoda2021_ldn_2") is None


def test_one_layout_parser_serves_batch_and_pipeline(tmp_path):
    from singan_insert.batch import find_crossmoda_cases
    from singan_insert.datasets.crossmoda import find_cases

    volume = np.zeros((8, 8, 8), np.float32)
    names = {"x_10": ".nii.gz", "x_2": ".nii", "x_3": ".nii.gz"}  # x_3 lacks its target
    for name, extension in names.items():
        for kind in ("ceT1", "Label"):
            write_volume(tmp_path / f"{name}_{kind}{extension}", volume)
        if name != "x_3":
            write_volume(tmp_path / f"{name}_fakehrT2{extension}", volume)
    write_volume(tmp_path / "x_2_fakehrT2.nii.gz", volume)  # another extension: not x_2's target
    (tmp_path / "x_4_Label.nii.bak").write_text("not a volume")
    found = find_cases(tmp_path, "Label", ("ceT1", "fakehrT2"))
    assert [(name, {k: p and p.name for k, p in files.items()}) for name, files in found] == [
        ("x_2", {"Label": "x_2_Label.nii", "ceT1": "x_2_ceT1.nii", "fakehrT2": "x_2_fakehrT2.nii"}),
        ("x_3", {"Label": "x_3_Label.nii.gz", "ceT1": "x_3_ceT1.nii.gz", "fakehrT2": None}),
        ("x_10", {"Label": "x_10_Label.nii.gz", "ceT1": "x_10_ceT1.nii.gz", "fakehrT2": "x_10_fakehrT2.nii.gz"}),
    ]
    cases = find_crossmoda_cases(tmp_path, "fakehrT2")
    assert [(c.name, c.target.name, c.source_image.name, c.source_label.name) for c in cases] == [
        ("x_2", "x_2_fakehrT2.nii", "x_2_ceT1.nii", "x_2_Label.nii"),
        ("x_10", "x_10_fakehrT2.nii.gz", "x_10_ceT1.nii.gz", "x_10_Label.nii.gz"),
    ]
    with pytest.raises(SinganInsertError, match="target-suffix"):
        find_crossmoda_cases(tmp_path, "hrT2")


# ---------------------------------------------------------------------- the chain
def test_synthetic_chain_runs_end_to_end(tmp_path, one_thread, capsys):
    work = tmp_path / "work"
    common = ["--synthetic", "--work", str(work), "--threads", "1", "--no-progress"]
    scripts = {stem: load_script(stem) for stem in STEPS}
    assert scripts["01_train_source_segmenter"].main(common + ["--profile", "tiny"]) == 0
    for stem in STEPS[1:]:
        assert scripts[stem].main(common) == 0, stem

    # The simulated data follow the crossMoDA layout: unpaired, labels only where crossMoDA has them.
    root = work / "data"
    assert sorted(p.name for p in (root / "source_training").iterdir()) == [
        f"crossmoda2021_ldn_{n}_{kind}.nii.gz" for n in (1, 2, 3) for kind in ("Label", "ceT1")]
    assert sorted(p.name for p in (root / "target_training").iterdir()) == [
        f"crossmoda2021_ldn_{n}_hrT2.nii.gz" for n in (4, 5, 6)]
    assert sorted(p.name for p in (root / "target_validation_labels").iterdir()) == [
        f"crossmoda2021_ldn_{n}_Label.nii.gz" for n in (7, 8)]

    with pytest.raises(SinganInsertError, match="other arguments"):
        simulate_crossmoda(root, 4, 3, 2)  # never mixes two simulated data sets in one folder

    data = CrossModaData(root)
    pipeline = CrossModaPipeline(data, work)  # reuses the stored tiny settings
    assert pipeline.settings == PipelineSettings.profile("tiny")

    # Step 2: each ceT1 scan has its fake hrT2 on the same working grid.
    ceT1 = nib.load(str(pipeline.grid_source("crossmoda2021_ldn_1")))
    fake = nib.load(str(pipeline.grid_source("crossmoda2021_ldn_1", "fakehrT2")))
    assert fake.shape == ceT1.shape == (32, 32, 16)
    np.testing.assert_allclose(fake.affine, ceT1.affine, atol=1e-5)

    # Step 4: B' and its naive twin carry the same tumor; they differ only by harmonization.
    for n in (1, 2, 3):
        stem = f"crossmoda2021_ldn_{n}_aug0"
        harmonized = np.asarray(nib.load(str(pipeline.bprime_dir("harmonized") / f"{stem}_image.nii.gz")).dataobj)
        naive = np.asarray(nib.load(str(pipeline.bprime_dir("naive") / f"{stem}_image.nii.gz")).dataobj)
        labels = [np.asarray(nib.load(str(pipeline.bprime_dir(v) / f"{stem}_label.nii.gz")).dataobj)
                  for v in ("harmonized", "naive")]
        np.testing.assert_array_equal(labels[0], labels[1])
        tumor = labels[0] == 1
        assert tumor.any()
        assert not np.allclose(harmonized[tumor], naive[tumor])
        record = json.loads((pipeline.bprime_dir("harmonized") / f"{stem}.json").read_text())
        assert record["parameters"]["appearance"] == "auto"  # the default: the model chooses the level
        far = np.ones_like(tumor)
        far[tuple(slice(max(int(i.min()) - 8, 0), int(i.max()) + 9) for i in np.nonzero(tumor))] = False
        np.testing.assert_array_equal(harmonized[far], fake_of(pipeline, n)[far])

    # Step 6: predictions lie on each validation scan's own grid, with crossMoDA's label values.
    for method in ("baseline", "ours", "naive"):
        for n in (7, 8):
            native = nib.load(str(root / "target_validation" / f"crossmoda2021_ldn_{n}_hrT2.nii.gz"))
            prediction = nib.load(str(pipeline.prediction(method, f"crossmoda2021_ldn_{n}")))
            assert prediction.shape == native.shape
            np.testing.assert_allclose(prediction.affine, native.affine, atol=1e-4)
            assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}

    # Step 7: the Table-1 report, consistent with a direct computation.
    report = json.loads((work / "evaluation" / "table1.json").read_text())
    methods = report["table"]["methods"]
    assert len(methods) == 3 and all(m["n_cases"] == 2 for m in methods.values())
    assert "DSC > 0.8" in (work / "evaluation" / "table1.md").read_text()
    assert (work / "evaluation" / "fig3.png").stat().st_size > 0
    case = report["per_case"]["ours"][0]
    truth = np.asarray(nib.load(str(data.truth(case["case"]))).dataobj) == 1
    prediction = np.asarray(nib.load(str(pipeline.prediction("ours", case["case"]))).dataobj) == 1
    assert case["dice"] == pytest.approx(dice(prediction, truth))

    # Re-running a step resumes: nothing is retrained.
    models = [work / "segmenter" / "segmenter.safetensors", work / "cyclegan" / "cyclegan.safetensors",
              work / "harmonizer" / "harmonizer.safetensors", work / "pix2pix" / "naive" / "pix2pix.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in models]
    assert scripts["05_pix2pix"].main(common) == 0
    assert scripts["01_train_source_segmenter"].main(common) == 0
    assert [p.stat().st_mtime_ns for p in models] == stamps

    # The work folder refuses other settings instead of mixing two runs.
    capsys.readouterr()
    assert scripts["02_cyclegan"].main(common + ["--profile", "cpu"]) == 2
    assert "other settings" in capsys.readouterr().err


def fake_of(pipeline, n):
    return np.asarray(nib.load(str(pipeline.grid_source(f"crossmoda2021_ldn_{n}", "fakehrT2"))).dataobj)


def test_scripts_explain_missing_data_and_missing_nnunet(tmp_path, capsys):
    script = load_script("01_train_source_segmenter")
    assert script.main(["--data-root", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w1")]) == 2
    assert "source_training" in capsys.readouterr().err
    assert script.main(["--work", str(tmp_path / "w2")]) == 2
    assert "--data-root" in capsys.readouterr().err
    if importlib.util.find_spec("nnunetv2") is None:
        for n in (1, 2):
            write_volume(tmp_path / "d" / "source_training" / f"x_{n}_ceT1.nii.gz", np.ones((8, 8, 8), np.float32))
            write_volume(tmp_path / "d" / "source_training" / f"x_{n}_Label.nii.gz", np.zeros((8, 8, 8), np.uint8))
        for folder in ("target_training", "target_validation"):
            write_volume(tmp_path / "d" / folder / "y_1_hrT2.nii.gz", np.ones((8, 8, 8), np.float32))
        assert script.main(["--data-root", str(tmp_path / "d"), "--work", str(tmp_path / "w3"),
                            "--segmenter", "nnunet"]) == 2
        assert "pip install 'singan-insert[nnunet]'" in capsys.readouterr().err
