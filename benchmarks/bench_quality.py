"""Harmonization quality against ground truth (the simulator's true hrT2 rendering of each tumor;
with ``--target ceT1`` the other way round: hrT2 tumors into ceT1, against its true ceT1 rendering).

Over a fixed, seeded set of simulated subjects (seeds 100, 101, ...): ONE harmonizer is trained
on ONE modality-B slice of a separate training subject (seed 0); a third subject (seed 99) is
kept apart to choose the blur of the blurred baselines. Each test subject's modality-A tumor is
pasted into its washed-out B volume (the CycleGAN stand-in) at every input (the mapped paste at
lambda in {0.5, 0.8, 1.0, 1.5}, and "raw": no lambda given), and every row of
:func:`singan_insert.evaluation.experiments.run_quality` is scored: naive, mapped, matched,
Poisson, blurred, best fixed lambda (hindsight, oracle-ish), oracle (truth render blended with
our weight), harmonized (paper mode: fixed lambda and start scale) and default (whatever
``InsertionParameters()`` gives).

Targets of issue 10, as PASS/FAIL per input for the default and the paper mode (computed from
the numbers in the tables):
  2. no vanishing: contrast ratio >= 0.6 (truth's sign, >= 0.6 of its magnitude) on >= 90 % of
     subjects;
  3. low-pass tumor error <= 0.7 x the best-fixed-lambda blurred paste's; W1 <= 0.7 x the mapped
     paste's; seam ratio in [0.9, 1.1];
  4. high-pass energy ratio in [0.7, 1.3]; two noise seeds differ by >= 0.3 x the truth's local
     texture sd; their mean levels within 0.05 of the robust range.

Writes benchmarks/results/bench_quality.{json,md} and the Fig.-2-style grid
benchmarks/results/bench_quality_fig2.png.

    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py            # 8 subjects, fast preset
    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py --quick    # plumbing only (numbers meaningless)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import RESULTS, machine, write_results  # noqa: E402

import numpy as np  # noqa: E402

TRAINING_SEED, VALIDATION_SEED, FIRST_TEST_SEED = 0, 99, 100


def _input(text: str):
    if text == "raw":
        return "raw"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an input is a contrast factor > 0 or 'raw', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a contrast factor must be > 0, got {value}")
    return value


def main(argv=None) -> None:
    from singan_insert.evaluation import experiments as ex

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=8, help="test subjects (default 8)")
    parser.add_argument("--inputs", type=_input, nargs="+", default=list(ex.QUALITY_INPUTS),
                        help="input pastes: contrast factors and/or 'raw' (default 0.5 0.8 1.0 1.5 raw)")
    parser.add_argument("--preset", default="fast", help="harmonizer training preset (default fast)")
    parser.add_argument("--iterations", type=int, help="override the preset's iterations per scale")
    parser.add_argument("--start-scale", type=int, help="paper mode's start scale (default: the model's default)")
    parser.add_argument("--model-dir", help="train into (and resume from) this folder; default: no folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--results", default=str(RESULTS), help="output folder (default benchmarks/results)")
    parser.add_argument("--name", default="bench_quality", help="results file name (without extension)")
    parser.add_argument("--first-seed", type=int, default=FIRST_TEST_SEED,
                        help=f"first test subject's seed (default {FIRST_TEST_SEED}; use unseen seeds for a held-out run)")
    parser.add_argument("--no-annotation", action="store_true",
                        help="leave out the 'annotated' row (the default insertion with the training slice's "
                             "tumor annotated)")
    parser.add_argument("--target", choices=("hrT2", "ceT1"), default="hrT2",
                        help="the modality inserted into (default hrT2, the crossMoDA direction; ceT1: the other "
                             "way round, an hrT2 tumor into ceT1, with the model trained on one ceT1 slice)")
    parser.add_argument("--quick", action="store_true",
                        help="2 subjects, 'tiny' training, inputs 0.5 and raw, short grids: plumbing only")
    args = parser.parse_args(argv)
    if args.subjects < 1:
        parser.error("--subjects must be >= 1")

    import torch

    from singan_insert import TrainingConfig, train_harmonizer
    from singan_insert.datasets.phantom import simulate_subject
    from singan_insert.evaluation.figures import figure_grid

    torch.set_num_threads(args.threads)
    lambda_grid, blur_sigmas = ex.LAMBDA_GRID, ex.BLUR_SIGMAS
    if args.quick:
        args.subjects, args.inputs, args.preset = min(args.subjects, 2), [0.5, "raw"], "tiny"
        lambda_grid, blur_sigmas = (0.5, 1.0), (0.0, 1.0)
    started = time.perf_counter()
    training_subject = simulate_subject(TRAINING_SEED)
    image, spacing, index = ex.training_slice_from_subject(training_subject, modality=args.target)
    source_modality = "ceT1" if args.target == "hrT2" else "hrT2"
    config = TrainingConfig.preset(args.preset)
    if args.iterations:
        config = replace(config, iterations=args.iterations)
    reused = bool(args.model_dir) and (Path(args.model_dir) / "harmonizer.safetensors").is_file()
    model = train_harmonizer(image, config, out_dir=args.model_dir, seed=0, spacing=spacing, device="cpu",
                             progress=False, provenance={"axis": 2, "slice_index": index, "modality": args.target})
    train_seconds = time.perf_counter() - started
    print(f"harmonizer: {args.preset} preset, {model.num_scales} scales, {train_seconds:.0f} s", flush=True)

    annotated = None
    if not args.no_annotation:  # the training subject's own tumor label on that slice: the one-slice annotation
        label = training_subject.label_b if args.target == "hrT2" else training_subject.label_a
        annotated = model.copy().annotate(np.take(label, index, axis=2) == 1)
    seeds = [args.first_seed + i for i in range(args.subjects)]
    subjects = [ex.QualitySubject.prepare(f"subject {seed}", simulate_subject(seed), model, args.target)
                for seed in seeds]
    validation = ex.QualitySubject.prepare(f"subject {VALIDATION_SEED} (validation)",
                                           simulate_subject(VALIDATION_SEED), model, args.target)
    figure_input = "raw" if "raw" in args.inputs else args.inputs[0]
    report = ex.run_quality(subjects, validation, model, inputs=args.inputs, lambda_grid=lambda_grid,
                            blur_sigmas=blur_sigmas, start_scale=args.start_scale, figure_input=figure_input,
                            progress=lambda text: print(f"  {text} ({time.perf_counter() - started:.0f} s)",
                                                        flush=True), annotated=annotated)

    results = Path(args.results)
    columns = ["source", "washed out", "naive", "mapped", "blurred", "harmonized", "default",
               *(["annotated"] if annotated is not None else []), "oracle", "truth"]
    shown = subjects[:4]
    figure = figure_grid(
        [[case.panels[c] for c in columns] for case in shown], results / f"{args.name}_fig2.png",
        [f"source ({source_modality})", f"{args.target} washed out", *columns[2:5],
         f"harmonized (paper, s{report['start_scale']})", *columns[6:-2], "oracle (truth, blended)",
         f"truth ({args.target})"],
        row_titles=[f"{case.name}, input {ex.input_key(figure_input)}" for case in shown],
        contours=[[None] * (len(columns) - 1) + [case.panels["mask"]] for case in shown])
    info = machine()
    report.update(
        quick=args.quick, target=args.target, preset=args.preset, iterations=config.iterations, num_scales=model.num_scales,
        training_seconds=None if reused else train_seconds, model_reused=reused, seconds=time.perf_counter() - started, threads=args.threads,
        test_seeds=seeds, training_seed=TRAINING_SEED, validation_seed=VALIDATION_SEED,
        lambda_grid=list(lambda_grid), blur_sigmas=list(blur_sigmas), figure=str(figure),
    )
    header = [
        f"Machine: {info['cpu_count']} CPUs, torch {info['torch']} with {args.threads} thread(s), {info['date']}; "
        f"{report['seconds'] / 60:.1f} min in all"
        f"{' (QUICK: plumbing only, the numbers mean nothing)' if args.quick else ''}.",
        f"Harmonizer: {args.preset!r} preset ({config.iterations} iterations per scale), {model.num_scales} scales, "
        f"trained on one {args.target} slice of subject {TRAINING_SEED} (tumors from {source_modality} inserted into "
        f"{args.target}) "
        f"{'earlier (loaded from --model-dir; see bench_train for training times)' if reused else f'in {train_seconds:.0f} s'}"
        f". Test subjects: seeds "
        f"{seeds[0]}..{seeds[-1]} ({len(seeds)}); metrics are means over them (texture: within slices, "
        f"sigma {ex.TEXTURE_SIGMA_PX} px). Figure: {figure.name}.",
        "",
    ]
    text = "\n".join(header) + ex.quality_markdown(report)
    print(text)
    write_results(args.name, report, text, folder=results)


if __name__ == "__main__":
    main()
