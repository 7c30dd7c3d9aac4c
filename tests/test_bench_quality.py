"""bench_quality: the --quick run writes valid JSON whose PASS/FAIL follow from its numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from singan_insert.evaluation import experiments as ex

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "bench_quality.py"
TARGETS = ["2_no_vanishing", "3_lowpass_vs_best_fixed_lambda", "3_w1_vs_mapped", "3_seam_ratio",
           "4_highpass_ratio", "4_seeds_differ", "4_seed_mean_level"]


def _reject_constant(name):
    raise ValueError(f"invalid JSON constant {name}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_quality")
    # A separate process: the script puts benchmarks/ on sys.path, whose _common module would
    # shadow the crossMoDA examples' own _common in this one.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--results", str(folder), "--name", "quick"],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    text = (folder / "quick.json").read_text()
    return folder, json.loads(text, parse_constant=_reject_constant)  # strict JSON: no NaN/Infinity


def test_quick_run_writes_the_tables(quick_run):
    folder, report = quick_run
    assert (folder / "quick.md").is_file() and (folder / "quick_fig2.png").stat().st_size > 0
    assert report["quick"] is True and report["machine"]["torch"]
    assert report["inputs"] == ["lambda=0.5", "raw"] and list(report["tables"]) == report["inputs"]
    for table in report["tables"].values():
        assert list(table["rows"]) == [*ex.QUALITY_ROWS, "annotated"]  # the bench annotates by default
        for row, metrics in table["rows"].items():
            for name in ("lowpass_nmae_tumor", "nmae_tumor", "wasserstein_tumor", "seam_ratio", "contrast_ratio",
                         "highpass_ratio"):
                assert len(metrics[name]["values"]) == 2, (row, name)
        for row in (*ex.SEEDED_ROWS, "annotated"):
            assert {"texture_difference", "mean_level_difference"} <= set(table["rows"][row])
            assert list(table["targets"][row]) == TARGETS
    markdown = (folder / "quick.md").read_text()
    assert "## Input paste: raw" in markdown and "best_fixed_lambda" in markdown
    # The baselines paste at the input's own lambda (not the default's automatic level): raw
    # (lambda = 1) maps the ceT1-bright tumor brighter than lambda = 0.5 does.
    tables = report["tables"]
    assert _mean(tables["raw"]["rows"], "mapped", "contrast") > _mean(tables["lambda=0.5"]["rows"], "mapped", "contrast")


def _mean(rows, row, metric):
    values = [v for v in rows[row][metric]["values"] if v is not None and math.isfinite(v)]
    return sum(values) / len(values)


def test_choices_and_verdicts_follow_from_the_numbers(quick_run):
    _, report = quick_run
    best = report["best_fixed_lambda"]
    errors = best["mean_lowpass_error_by_lambda"]
    assert ex.input_key(best["lambda"]) == min(errors, key=errors.get)
    for choice in report["blur_sigma"].values():
        errors = choice["validation_lowpass_error"]
        assert f"{choice['chosen']:g}" == min(errors, key=errors.get)
    for table in report["tables"].values():
        rows = table["rows"]
        for row in ex.SEEDED_ROWS:
            targets = table["targets"][row]
            ratios = [r for r in rows[row]["contrast_ratio"]["values"] if r is not None]
            visible = sum(r >= 0.6 for r in ratios) / len(ratios)
            assert targets["2_no_vanishing"]["value"] == pytest.approx(visible)
            assert targets["2_no_vanishing"]["pass"] == (visible >= 0.9)
            lowpass = _mean(rows, row, "lowpass_nmae_tumor") / _mean(rows, "best_fixed_lambda", "lowpass_nmae_tumor")
            assert targets["3_lowpass_vs_best_fixed_lambda"]["value"] == pytest.approx(lowpass)
            assert targets["3_lowpass_vs_best_fixed_lambda"]["pass"] == (lowpass <= 0.7)
            w1 = _mean(rows, row, "wasserstein_tumor") / _mean(rows, "mapped", "wasserstein_tumor")
            assert targets["3_w1_vs_mapped"]["pass"] == (w1 <= 0.7)
            seam = _mean(rows, row, "seam_ratio")
            assert targets["3_seam_ratio"]["pass"] == (0.9 <= seam <= 1.1)
            seeds = _mean(rows, row, "texture_difference")
            assert targets["4_seeds_differ"]["pass"] == (seeds >= 0.3)


def _rows(**means):
    """Aggregated rows as run_quality builds them, with every metric at the given mean."""
    base = {"lowpass_nmae_tumor": 0.1, "wasserstein_tumor": 0.1, "seam_ratio": 1.0, "highpass_ratio": 1.0,
            "texture_difference": 0.5, "mean_level_difference": 0.0}
    rows = {row: {m: {"mean": v, "values": [v]} for m, v in base.items()} for row in ("mapped", "best_fixed_lambda")}
    default = {**base, **means}
    rows["default"] = {m: {"mean": v, "values": [v]} for m, v in default.items()}
    ratios = means.get("contrast_ratios", [1.0] * 10)
    rows["default"]["contrast_ratio"] = {"mean": sum(ratios) / len(ratios), "values": ratios}
    return rows


def test_quality_targets_flip_with_the_numbers():
    good = ex.quality_targets(_rows(lowpass_nmae_tumor=0.05, wasserstein_tumor=0.05), "default")
    assert all(check["pass"] for check in good.values())
    cases = {
        "2_no_vanishing": _rows(lowpass_nmae_tumor=0.05, wasserstein_tumor=0.05,
                                contrast_ratios=[1.0] * 8 + [0.5, -1.0]),  # 80 % visible
        "3_lowpass_vs_best_fixed_lambda": _rows(lowpass_nmae_tumor=0.08, wasserstein_tumor=0.05),
        "3_w1_vs_mapped": _rows(lowpass_nmae_tumor=0.05, wasserstein_tumor=0.08),
        "3_seam_ratio": _rows(lowpass_nmae_tumor=0.05, wasserstein_tumor=0.05, seam_ratio=1.2),
        "4_highpass_ratio": _rows(lowpass_nmae_tumor=0.05, wasserstein_tumor=0.05, highpass_ratio=0.6),
        "4_seeds_differ": _rows(lowpass_nmae_tumor=0.05, wasserstein_tumor=0.05, texture_difference=0.0),
        "4_seed_mean_level": _rows(lowpass_nmae_tumor=0.05, wasserstein_tumor=0.05, mean_level_difference=0.06),
    }
    for name, rows in cases.items():
        checks = ex.quality_targets(rows, "default")
        assert [n for n, c in checks.items() if not c["pass"]] == [name]
    assert ex.quality_targets(cases["2_no_vanishing"], "default")["2_no_vanishing"]["value"] == pytest.approx(0.8)
