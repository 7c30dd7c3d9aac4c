"""Cost of verified model files: save and load times with the digest and checks, vs plain safetensors.

``save_tensors`` / ``load_tensors`` hash every byte (SHA-256), parse and check the header
themselves, and check every floating tensor for NaN/inf. This measures what that costs on files
of a few sizes (float32 tensors of 1 MiB each), against ``safetensors.torch.save`` /
``load`` of the same tensors, and the load of a real ``fast``-preset harmonizer file. Median of
``--repeats`` runs. Writes benchmarks/results/bench_model_file.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import table, write_results  # noqa: E402


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from safetensors.torch import load_file, save_file

    from singan_insert import Harmonizer, TrainingConfig, train_harmonizer
    from singan_insert.datasets.phantom import simulate_subject
    from singan_insert.evaluation.experiments import training_slice_from_subject
    from singan_insert.harmonizer.model_file import load_tensors, save_tensors

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for size in args.sizes_mib:
            generator = torch.Generator().manual_seed(0)
            tensors = {f"t{i}": torch.randn(1 << 18, generator=generator) for i in range(size)}
            ours, plain = work / "ours.safetensors", work / "plain.safetensors"
            row = {"file": f"{size} x 1 MiB float32",
                   "save_s": median_seconds(lambda: save_tensors(ours, tensors, "bench"), args.repeats),
                   "plain_save_s": median_seconds(lambda: save_file(tensors, str(plain)), args.repeats),
                   "load_s": median_seconds(lambda: load_tensors(ours, "bench"), args.repeats),
                   "plain_load_s": median_seconds(lambda: {k: v.clone() for k, v in load_file(str(plain)).items()},
                                                  args.repeats)}
            row["load_MiB_per_s"] = size / row["load_s"]
            rows.append(row)
            print(row, flush=True)
        image, spacing, _ = training_slice_from_subject(simulate_subject(0))
        train_harmonizer(image, replace(TrainingConfig.preset("fast"), iterations=2), out_dir=work / "model",
                         seed=0, spacing=spacing, progress=False, sample_figures=False)
        model_path = work / "model" / "harmonizer.safetensors"
        rows.append({"file": f"fast harmonizer ({model_path.stat().st_size / 1024:.0f} KiB), Harmonizer.load",
                     "load_s": median_seconds(lambda: Harmonizer.load(model_path, device="cpu"), args.repeats)})
    columns = ["file", "save_s", "plain_save_s", "load_s", "plain_load_s", "load_MiB_per_s"]
    markdown = "# Model files: verified save/load vs plain safetensors\n\n" + table(rows, columns)
    print(markdown)
    write_results("bench_model_file", {"repeats": args.repeats, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
