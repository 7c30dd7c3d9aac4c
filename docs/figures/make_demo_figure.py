"""Produce the quickstart's picture and metrics: the output of ``singan-insert demo``.

Runs :func:`singan_insert.evaluation.demo.run_demo` (the README's main-job command, same defaults: the
``fast`` preset, 3 simulated subjects) in a temporary folder, then copies

* ``fig2_panel.png``  -> ``docs/figures/demo_fig2_panel.png``
* ``metrics.md``      -> ``docs/figures/demo_metrics.md`` (with a line saying when, where and how
  long the run took), which ``docs/quickstart.md`` includes at build time.

Run from the repository root (about 5 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=1 python docs/figures/make_demo_figure.py

``--from-output DIR`` takes the files from an existing ``singan-insert demo --out DIR`` run
instead of running the demo again (the files are the demo's own output either way).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from-output", type=Path, help="an existing `singan-insert demo` output folder")
    parser.add_argument("--iterations", type=int, help="override the preset's iterations per scale")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        if args.from_output is None:
            from singan_insert.evaluation.demo import run_demo

            out = Path(scratch) / "demo_output"
            run_demo(out_dir=out, iterations=args.iterations, device="cpu")
        else:
            out = args.from_output
        report = json.loads((out / "metrics.json").read_text())
        shutil.copyfile(out / "fig2_panel.png", HERE / "demo_fig2_panel.png")
        import torch

        date = datetime.datetime.fromtimestamp((out / "metrics.json").stat().st_mtime,
                                               datetime.timezone.utc).strftime("%Y-%m-%d")
        command = "singan-insert demo" + (f" --iterations {args.iterations}" if args.iterations else "")
        appearance = report["parameters"].get("appearance", "auto")
        annotated = ", tumor annotated on the training slice" if report.get("annotated") else ""
        note = (f"*`{command}` (preset `{report['preset']}`, appearance `{appearance}`{annotated}, "
                f"start scale {report['default_start_scale']} for the default insertion) took {report['seconds']:.0f} s on {os.cpu_count()} CPU cores "
                f"({platform.machine()}, torch {torch.__version__}), {date}. Lower is better for "
                "the errors; 1 is the truth for the ratios.*")
        table = (out / "metrics.md").read_text().strip().split("\n")
        body = "\n".join(line for line in table if not line.startswith("# "))
        (HERE / "demo_metrics.md").write_text(f"{body.strip()}\n\n{note}\n")
    print(f"Wrote {HERE / 'demo_fig2_panel.png'} and {HERE / 'demo_metrics.md'}")


if __name__ == "__main__":
    main()
