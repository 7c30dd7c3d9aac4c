"""Training speed and memory of the harmonizer pyramid (issue: fast on a 2-core CPU).

For a 128^2 and a 256^2 hrT2-like slice from the simulator: the ``fast`` preset trained fully,
and the ``reference`` preset (the official SinGAN schedule) for a bounded number of iterations
per scale, extrapolated to its 2000 iterations. Each run is a separate process so that its
peak RSS is its own. Prints a markdown table and writes benchmarks/results/bench_train.{json,md}.

    python benchmarks/bench_train.py                  # both sizes, both presets
    python benchmarks/bench_train.py --sizes 128 --reference-iterations 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, table, write_results  # noqa: E402

TARGETS = {128: 180.0, 256: 300.0}  # seconds, fast preset (issue 10: <= 3 min at 128^2, <= 5 min at 256^2)
RSS_TARGET_MB_256 = 1536


def one_run(size: int, preset: str, iterations: int | None, device: str) -> dict:
    import numpy as np

    from singan_insert import TrainingConfig, train_harmonizer
    from singan_insert.evaluation.experiments import training_slice_from_subject
    from singan_insert.datasets.phantom import simulate_subject

    subject = simulate_subject(0, shape=(size, size, 32))
    image, spacing, _ = training_slice_from_subject(subject)
    config = TrainingConfig.preset(preset)
    if iterations:
        config = replace(config, iterations=iterations)
    started = time.perf_counter()
    model = train_harmonizer(image, config, seed=0, spacing=spacing, device=device, progress=False,
                             sample_figures=False)
    wall = time.perf_counter() - started
    log = model.metadata["training"]["log"]
    per_scale = [{"scale": e["scale"], "size": e["size"], "s_per_it": e["seconds_per_iteration"],
                  "rec_rmse": e["reconstruction_rmse"], "noise_amp": e["noise_amplitude"]} for e in log]
    full_iterations = TrainingConfig.preset(preset).iterations
    extrapolated = sum(e["s_per_it"] * full_iterations for e in per_scale)
    return {"size": size, "preset": preset, "iterations_run": config.iterations,
            "full_iterations": full_iterations, "scales_trained": len(log), "num_scales": model.num_scales,
            "wall_s": wall, "extrapolated_full_s": extrapolated, "per_scale": per_scale,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--reference-iterations", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "PRESET", "ITERATIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, preset, iterations = int(args.one[0]), args.one[1], int(args.one[2]) or None
        print(json.dumps(one_run(size, preset, iterations, args.device)))
        return
    runs = []
    for size in args.sizes:
        plans = [("fast", 0)] + ([] if args.no_reference else [("reference", args.reference_iterations)])
        for preset, iterations in plans:
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--one", str(size), preset,
                                  str(iterations)], capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["target_s"] = TARGETS.get(size) if preset == "fast" else None
            run["meets_time_target"] = run["target_s"] is None or run["wall_s"] <= run["target_s"]
            # Beside the wall time: on a shared machine it also counts other processes' work.
            run["load_average"] = round(os.getloadavg()[0], 1)
            runs.append(run)
            print(f"{size}^2 {preset}: {run['wall_s']:.0f} s for {run['iterations_run']} it/scale "
                  f"(full schedule ~{run['extrapolated_full_s'] / 60:.1f} min), peak RSS {run['peak_rss_mb']:.0f} MB",
                  flush=True)
    rows = [{"size": f"{r['size']}^2", "preset": r["preset"], "it/scale run": r["iterations_run"],
             "scales trained": f"{r['scales_trained']}/{r['num_scales']}", "wall (s)": r["wall_s"],
             "full schedule (min)": r["extrapolated_full_s"] / 60, "peak RSS (MB)": r["peak_rss_mb"],
             "target (s)": r["target_s"] or "-", "device": r["device"], "load average": r["load_average"]}
            for r in runs]
    markdown = table(rows, list(rows[0]))
    detail = ["", "Seconds per iteration per scale:", ""]
    for r in runs:
        detail.append(f"- {r['size']}^2 {r['preset']}: " + ", ".join(
            f"s{e['scale']} {e['size'][0]}px {e['s_per_it']:.3f}" for e in r["per_scale"]))
    markdown += "\n" + "\n".join(detail)
    m = machine()
    markdown = f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, {m['date']}\n\n" + markdown
    print(markdown)
    write_results("bench_train", {"runs": runs, "rss_target_mb_256": RSS_TARGET_MB_256}, markdown)


if __name__ == "__main__":
    main()
