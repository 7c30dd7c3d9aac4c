"""Dataset-scale insertion: subjects/s on a simulated crossMoDA-size folder, and where the time goes.

A folder of ``--cases`` cases in the crossMoDA layout at real size (hrT2 448x448x80 at
0.4x0.4x1 mm, ceT1 source with its label; simulated by ``datasets.phantom``, ``--distinct``
different subjects cycled over the case names, since simulating one takes about a minute), one
augmentation per case, written as ``.nii.gz``:

* the batch API (``singan_insert.batch``, as ``singan-insert insert``, with its defaults: image
  gzip level 0, automatic appearance) with 1 and 2 CPU worker processes (spawn, each loading the
  model once): target >= 0.5 subject/s with 2 workers on 2 cores; and its single-process batched
  path (``--batch-cases``, what ``--device cuda`` runs) on CPU and, when there is one, on CUDA
  (target there: >= 5 subjects/s, I/O included);
* the multi-case path (``insertion.multicase``: one process holds the model, batches the tumor
  slices of ``--chunk`` cases per forward pass, reads and writes in background threads) on CPU,
  and on CUDA when a GPU is available (target there: >= 5 subjects/s, I/O included);
* a breakdown of one process's time per subject (cases one after the other, no overlap) into
  reading from disk, gunzip, NIfTI parsing, compute (source crop + ``insert_tumor``), NIfTI
  serialisation, gzip (level 1, what ``io.write_nifti`` uses) and writing to disk;
* the time and size of gzip at levels 0 (stored: a valid ``.nii.gz`` without compression), 1
  and 6 on one real-size image and label, and the multi-case path once more with the images
  at ``--gzip-level`` (default 0; labels stay at level 1): simulated (and real) MR intensities are noisy floats, which
  gzip barely shrinks, so the compression level is the main I/O lever.

The model is a ``fast``-preset pyramid trained for 2 iterations per scale (speed depends on the
architecture, not the weights). Writes benchmarks/results/bench_batch.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from collections import defaultdict
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import table, write_results  # noqa: E402

SHAPE = (448, 448, 80)
GZIP_LEVEL = 1  # io.write_nifti's (and so the batch API's) level
PARTS = ("read", "gunzip", "parse", "compute", "serialise", "gzip", "write")


def make_folder(root: Path, cases: int, distinct: int, shape) -> Path:
    from singan_insert.datasets.phantom import simulate_subject, write_crossmoda

    folder = root / "data"
    for index in range(distinct):
        started = time.perf_counter()
        write_crossmoda(simulate_subject(100 + index, shape=tuple(shape)), folder, f"sim_{index:03d}")
        print(f"simulated subject {index} in {time.perf_counter() - started:.0f} s", flush=True)
    for index in range(distinct, cases):
        for kind in ("ceT1", "Label", "hrT2"):
            shutil.copyfile(folder / f"sim_{index % distinct:03d}_{kind}.nii.gz",
                            folder / f"sim_{index:03d}_{kind}.nii.gz")
    return folder


def batch_api(folder: Path, model: Path, out: Path, workers: int, extra: tuple[str, ...] = ()) -> float:
    """``singan-insert insert`` on the folder with its defaults (image gzip level 0), timed."""
    from singan_insert.batch import add_insert_arguments, run_insert

    parser = argparse.ArgumentParser()
    add_insert_arguments(parser)
    args = parser.parse_args(["--model", str(model), "--data-root", str(folder), "--out", str(out),
                              "--target-suffix", "hrT2", "--workers", str(workers), *extra])
    started = time.perf_counter()
    if run_insert(args) != 0:
        raise RuntimeError("the batch run reported failures")
    return time.perf_counter() - started


def read_nifti(path: Path, timings: dict) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    started = time.perf_counter()
    raw = path.read_bytes()
    timings["read"] += time.perf_counter() - started
    started = time.perf_counter()
    raw = gzip.decompress(raw)
    timings["gunzip"] += time.perf_counter() - started
    started = time.perf_counter()
    image = nib.Nifti1Image.from_bytes(raw)
    data = np.asarray(image.dataobj)
    timings["parse"] += time.perf_counter() - started
    return data, image.affine


def write_gz(path: Path, data: np.ndarray, affine: np.ndarray, level: int, timings: dict) -> None:
    import nibabel as nib

    from singan_insert.io import atomic_write_bytes

    started = time.perf_counter()
    payload = nib.Nifti1Image(data, affine).to_bytes()
    timings["serialise"] += time.perf_counter() - started
    started = time.perf_counter()
    payload = gzip.compress(payload, compresslevel=level, mtime=0)
    timings["gzip"] += time.perf_counter() - started
    started = time.perf_counter()
    atomic_write_bytes(path, payload)
    timings["write"] += time.perf_counter() - started


def parameters_for(case, settings):
    """The same draw as batch.prepare_case for augmentation 0 of ``case`` (the shared sampler)."""
    from singan_insert.batch import derived_seed
    from singan_insert.insertion.insert import InsertionParameters

    drawn = settings.ranges().sample(np.random.default_rng(derived_seed(settings.seed, case.name, 0)))
    return InsertionParameters(appearance=settings.appearance, intensity_mode=settings.intensity_mode,
                               contrast=drawn.contrast, start_scale=drawn.start_scale, seed=drawn.seed,
                               label_value=settings.label_value)


def stages(model: Path, device: str, gzip_level: int, out: Path, timings: dict):
    """``read``, ``process`` and ``write`` of the multi-case path, each adding to ``timings``."""
    from singan_insert.batch import InsertSettings
    from singan_insert.harmonizer.model import Harmonizer
    from singan_insert.insertion.multicase import InsertionCase, insert_tumors
    from singan_insert.insertion.placement import SourceTumor

    settings = InsertSettings()
    harmonizer = Harmonizer.load(model, device=device)
    out.mkdir(parents=True, exist_ok=True)

    def read(case):
        target, affine = read_nifti(case.target, timings)
        source_image, source_affine = read_nifti(case.source_image, timings)
        source_label, _ = read_nifti(case.source_label, timings)
        started = time.perf_counter()
        source = SourceTumor.from_arrays(source_image, source_label, source_affine, label_value=1)
        timings["compute"] += time.perf_counter() - started
        return InsertionCase(target.astype(np.float32, copy=False), affine, source,
                             parameters_for(case, settings))

    def process(chunk_cases):
        started = time.perf_counter()
        results = insert_tumors(chunk_cases, harmonizer)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings["compute"] += time.perf_counter() - started
        return [(c.target_affine, r) for c, r in zip(chunk_cases, results)]

    def write(case, value):
        affine, result = value
        write_gz(out / f"{case.name}_aug0_image.nii.gz", result.image.astype(np.float32), affine,
                 gzip_level, timings)
        # Labels are mostly zeros: level 1 shrinks them ~100x in milliseconds, whatever the image's.
        write_gz(out / f"{case.name}_aug0_label.nii.gz", result.label, affine, GZIP_LEVEL, timings)
        (out / f"{case.name}_aug0.json").write_text(json.dumps(result.record, default=str))

    return read, process, write


def multicase_run(cases, model: Path, out: Path, device: str, chunk: int, io_threads: int,
                  gzip_level: int) -> float:
    """One process: ``chunk`` cases per insert_tumors call, I/O in ``io_threads`` threads."""
    from singan_insert.insertion.multicase import pipelined

    read, process, write = stages(model, device, gzip_level, out, defaultdict(float))
    started = time.perf_counter()
    pipelined(cases, read, process, write, chunk_size=chunk, io_threads=io_threads)
    return time.perf_counter() - started


def breakdown_run(cases, model: Path, out: Path, gzip_level: int) -> tuple[dict, float]:
    """One case after the other on one thread (no overlap): the parts add up to the wall time."""
    timings = dict.fromkeys(PARTS, 0.0)
    read, process, write = stages(model, "cpu", gzip_level, out, timings)
    started = time.perf_counter()
    for case in cases:
        (value,) = process([read(case)])
        write(case, value)
    return timings, time.perf_counter() - started


def gzip_levels(folder: Path, levels=(0, 1, 6)) -> list[dict]:
    """Time and size of gzip at each level for one real-size image and label (serialised NIfTI)."""
    import nibabel as nib

    rows = []
    for kind in ("hrT2", "Label"):
        path = next(folder.glob(f"*_{kind}.nii.gz"))
        payload = nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes())).to_bytes()
        for level in levels:
            started = time.perf_counter()
            compressed = gzip.compress(payload, compresslevel=level, mtime=0)
            compress_s = time.perf_counter() - started
            started = time.perf_counter()
            gzip.decompress(compressed)
            rows.append({"volume": kind, "level": level, "MB": len(compressed) / 1e6,
                         "ratio": len(compressed) / len(payload), "gzip (s)": compress_s,
                         "gunzip (s)": time.perf_counter() - started})
    return rows


def level_advice(levels: list[dict]) -> str:
    """One sentence on the image's level 0 against level 1, from the measured table."""
    image = {row["level"]: row for row in levels if row["volume"] == "hrT2"}
    if 0 not in image or 1 not in image:
        return ""
    return (f"Image at gzip level 0 (stored) instead of 1: {image[0]['MB'] / image[1]['MB']:.2f}x the "
            f"file size, {image[1]['gzip (s)'] - image[0]['gzip (s)']:.2f} s less gzip per volume; "
            "labels compress ~100x at level 1 in milliseconds, so they keep it.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--distinct", type=int, default=2, help="different simulated subjects")
    parser.add_argument("--breakdown-cases", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=4, help="cases per forward pass (multi-case path)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                        help="batch-API worker counts (none: skip those rows)")
    parser.add_argument("--gzip-level", type=int, default=0,
                        help="also run the multi-case path with this gzip level for the images "
                             "(0: stored, no compression; labels keep level 1)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(SHAPE),
                        help="hrT2 grid (default: crossMoDA's real size; smaller for a quick check)")
    parser.add_argument("--work", help="working folder (default: a temporary one, deleted)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from singan_insert import TrainingConfig, train_harmonizer
    from singan_insert.batch import find_crossmoda_cases
    from singan_insert.datasets.phantom import simulate_subject
    from singan_insert.evaluation.experiments import training_slice_from_subject

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_batch_"))
    image, spacing, _ = training_slice_from_subject(simulate_subject(0))
    train_harmonizer(image, replace(TrainingConfig.preset("fast"), iterations=2), out_dir=work / "model",
                     seed=0, spacing=spacing, progress=False, sample_figures=False,
                     provenance={"axis": 2, "modality": "hrT2"})
    model = work / "model" / "harmonizer.safetensors"
    folder = make_folder(work, args.cases, args.distinct, args.shape)
    cases = find_crossmoda_cases(folder, "hrT2")

    rows = []
    for workers in args.workers:
        seconds = batch_api(folder, model, work / f"out_batch_{workers}", workers)
        rows.append({"path": f"batch API, {workers} worker(s)", "device": "cpu", "subjects": len(cases),
                     "seconds": seconds, "subjects/s": len(cases) / seconds})
        print(rows[-1], flush=True)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:  # the CLI's single-process batched path (what --device cuda runs)
        seconds = batch_api(folder, model, work / f"out_batched_{device}", 1,
                            ("--device", device, "--batch-cases", str(args.chunk)))
        rows.append({"path": f"batch API, --device {device} --batch-cases {args.chunk}", "device": device,
                     "subjects": len(cases), "seconds": seconds, "subjects/s": len(cases) / seconds})
        print(rows[-1], flush=True)
    for device in devices:
        for level in sorted({GZIP_LEVEL, args.gzip_level}):
            seconds = multicase_run(cases, model, work / f"out_multicase_{device}_{level}", device,
                                    args.chunk, 2, level)
            rows.append({"path": f"multicase, chunk {args.chunk}, 2 I/O threads, image gzip {level}",
                         "device": device, "subjects": len(cases), "seconds": seconds,
                         "subjects/s": len(cases) / seconds})
            print(rows[-1], flush=True)

    subset = cases[:args.breakdown_cases]
    timings, wall = breakdown_run(subset, model, work / "out_breakdown", GZIP_LEVEL)
    breakdown = [{"part": part, "s per subject": value / len(subset), "share": value / wall}
                 for part, value in timings.items()]
    breakdown.append({"part": "wall", "s per subject": wall / len(subset), "share": 1.0})
    levels = gzip_levels(folder)
    two = next((r for r in rows if r["path"] == "batch API, 2 worker(s)"), None)
    summary = [{"measure": "batch API, 2 CPU workers: subjects/s", "value": two["subjects/s"] if two else "-",
                "target": ">= 0.5"}]
    cuda = next((r for r in rows if r["device"] == "cuda" and r["path"].startswith("batch API")), None)
    summary.append({"measure": "batch API on one GPU (--device cuda): subjects/s", "value": cuda["subjects/s"] if cuda else
                    "no GPU here", "target": ">= 5"})
    markdown = (f"{len(cases)} cases of {'x'.join(map(str, args.shape))} (hrT2) at 0.4x0.4x1 mm, one "
                f"augmentation each, .nii.gz (batch API rows: insert's defaults, images at gzip level 0, labels at 1; multicase rows: the image level they name)\n\n"
                + table(rows, ["path", "device", "subjects", "seconds", "subjects/s"]) + "\n\n"
                + f"Time per subject, one process, {len(subset)} cases one after the other (no overlap; "
                  f"gzip level {GZIP_LEVEL}):\n\n"
                + table(breakdown, ["part", "s per subject", "share"]) + "\n\n"
                + "gzip of one real-size volume (serialised NIfTI) by level:\n\n"
                + table(levels, ["volume", "level", "MB", "ratio", "gzip (s)", "gunzip (s)"]) + "\n\n"
                + level_advice(levels) + "\n\n"
                + table(summary, ["measure", "value", "target"]))
    print(markdown)
    if tuple(args.shape) != SHAPE:
        print("(not the real size: results not written)")
        return
    write_results("bench_batch", {"shape": SHAPE, "cases": len(cases), "distinct_subjects": args.distinct,
                                  "gzip_level": GZIP_LEVEL, "rows": rows, "breakdown": breakdown,
                                  "gzip_levels": levels}, markdown)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
