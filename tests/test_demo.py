"""The README's first command, ``singan-insert demo``, end to end (shortened training), and its report."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from singan_insert.evaluation.experiments import FIDELITY_COLUMNS, fidelity_markdown


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    completed = subprocess.run(
        [sys.executable, "-m", "singan_insert", "demo", "--out", str(out), "--subjects", "1", "--preset", "tiny",
         "--iterations", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed.stdout


def test_demo_writes_what_the_readme_lists(demo):
    out, printed = demo
    for name in ("model/harmonizer.safetensors", "model/training_log.json", "metrics.md", "metrics.json",
                 "data/demo_001_ceT1.nii.gz", "data/demo_001_Label.nii.gz", "data/demo_001_hrT2_washed_out.nii.gz",
                 "data/demo_001_hrT2_augmented.nii.gz", "data/demo_001_hrT2_augmented_Label.nii.gz"):
        assert (out / name).is_file(), name
    augmented = nib.load(out / "data/demo_001_hrT2_augmented.nii.gz")
    washed = nib.load(out / "data/demo_001_hrT2_washed_out.nii.gz")
    label = np.asarray(nib.load(out / "data/demo_001_hrT2_augmented_Label.nii.gz").dataobj)
    assert np.allclose(augmented.affine, washed.affine) and label.shape == augmented.shape
    assert set(np.unique(label)) == {0, 1}
    changed = ~np.isclose(np.asarray(augmented.dataobj), np.asarray(washed.dataobj))
    assert changed[label == 1].mean() > 0.9  # the tumor is there, where its label says
    assert "How to read it" in printed


def test_demo_report_has_the_simple_rivals_and_says_how_to_read_it(demo):
    out, _ = demo
    report = json.loads((out / "metrics.json").read_text())
    fidelity = report["fidelity"]
    default = f"singan_s{report['default_start_scale']}"
    assert list(fidelity)[:4] == ["naive_raw", "naive_mapped", "blurred_mapped", "poisson"] and default in fidelity
    for method in fidelity.values():
        assert set(FIDELITY_COLUMNS) <= set(method)
        assert all(np.isfinite(method[m]["mean"]) for m in FIDELITY_COLUMNS if m != "contrast_ratio")
    # The blur is a real rival: smoother than the paste it blurs, at the same level.
    assert fidelity["blurred_mapped"]["seam_ratio"]["mean"] < fidelity["naive_mapped"]["seam_ratio"]["mean"]
    text = (out / "metrics.md").read_text()
    assert "DEFAULT insertion (start scale" in text and "auto-level paste blurred (sd 1 px)" in text
    assert "lower is better" in text and "bench_pipeline" in text


def test_fidelity_markdown_labels_and_reference():
    summary = {name: {metric: {"mean": value} for metric in FIDELITY_COLUMNS}
               for name, value in (("ref", 0.5), ("other", 0.25))}
    table = fidelity_markdown(summary, reference="ref", labels={"ref": "the reference"})
    rows = [line for line in table.splitlines() if line.startswith("| the reference") or line.startswith("| other")]
    assert rows[0].endswith("| 1.00 |") and rows[1].endswith("| 0.50 |")
    assert "relative to that of: the reference." in table
