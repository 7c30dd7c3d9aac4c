"""Development check: does the same anatomy stored another way round get the same tumor?

The target of each simulated subject (seeds 200, 201, ...; washed-out hrT2) is stored four ways:
as simulated (RAS, the training volume's orientation), mirrored left-right, mirrored
anterior-posterior, and with its in-plane axes swapped (same voxels, same world, another
affine). A tumor is inserted into each with the same parameters, by one harmonizer (``fast``
preset, ONE hrT2 slice of subject 0, as in ``dev_harmonizer.py``) without and with its training
orientation recorded (:mod:`singan_insert.insertion.orientation`), unannotated and annotated,
and scored against the simulator's truth (columns as in ``dev_harmonizer.py``). ``max |Δmean|``
is the largest change, over subjects, of the inserted tumor's mean from the as-stored one
(% of it); ``identical`` counts subjects whose output, brought back to RAS, equals the as-stored
one bit for bit.

Run: ``python benchmarks/dev_orientation.py [--subjects 8] [--model-dir DIR]``; prints a markdown
table and writes benchmarks/results/dev_orientation.{json,md}.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import add_subject_arguments, development_case, development_model, machine, table, write_results  # noqa: E402
from dev_harmonizer import scores  # noqa: E402


def storages(volume, affine):
    """``(name, stored volume, its affine, back-to-RAS function)`` for the four ways round."""
    yield "as stored (RAS)", volume, affine, lambda v: v
    for axis, name in ((0, "mirrored L-R"), (1, "mirrored A-P")):
        flipped = affine.copy()
        flipped[:3, 3] += affine[:3, axis] * (volume.shape[axis] - 1)
        flipped[:, axis] *= -1
        yield name, np.ascontiguousarray(np.flip(volume, axis)), flipped, lambda v, a=axis: np.flip(v, a)
    yield "in-plane axes swapped", np.ascontiguousarray(volume.transpose(1, 0, 2)), affine[:, [1, 0, 2, 3]], \
        lambda v: v.transpose(1, 0, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser)  # the model in --model-dir is reused when there
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from singan_insert.insertion.insert import InsertionParameters, insert_tumor
    from singan_insert.io import orientation_codes

    model, training_subject, index = development_model(args.model_dir)
    unoriented = model.copy()
    unoriented.metadata = {**model.metadata, "provenance": {
        k: v for k, v in model.provenance.items() if k != "orientation"}}
    oriented = model.copy()
    oriented.metadata = {**model.metadata, "provenance": {
        **model.provenance, "orientation": orientation_codes(training_subject.affine_b)}}
    annotation = np.take(training_subject.label_b, index, axis=2) == 1
    models = {}
    for name, harmonizer in (("without orientation", unoriented), ("with orientation", oriented)):
        models[f"unannotated, {name}"] = harmonizer
        models[f"annotated, {name}"] = harmonizer.copy().annotate(annotation)

    results: dict[tuple[str, str], list[dict]] = {}
    for seed in range(args.first_seed, args.first_seed + args.subjects):
        subject, washed, source, spacing, axis = development_case(seed)
        washed = washed.astype(np.float32)
        for model_name, harmonizer in models.items():
            reference = None
            for storage, volume, affine, back in storages(washed, subject.affine_b):
                result = insert_tumor(volume, affine, source, harmonizer, InsertionParameters(seed=0))
                output, mask = back(result.image), back(result.mask)
                truth = subject.render_b(mask)
                value_range = float(np.subtract(*np.percentile(truth, (99.5, 0.5))))
                row = scores(output, truth, mask, spacing, axis, value_range)
                row["tumor_mean"] = float(output[mask].mean())
                if reference is None:
                    reference = output
                row["identical"] = float(np.array_equal(output, reference))
                results.setdefault((model_name, storage), []).append(row)
        print(f"seed {seed} done", flush=True)

    rows = []
    for (model_name, storage), per_subject in results.items():
        reference = results[(model_name, "as stored (RAS)")]
        change = max(abs(r["tumor_mean"] - ref["tumor_mean"]) / abs(ref["tumor_mean"])
                     for r, ref in zip(per_subject, reference))
        row = {"model": model_name, "stored": storage}
        for key in ("c_ratio", "lp_err", "w1", "seam", "hp"):
            row[key] = float(np.mean([r[key] for r in per_subject]))
        row["max_mean_change_pct"] = 100 * change
        row["identical"] = f"{int(sum(r['identical'] for r in per_subject))}/{len(per_subject)}"
        rows.append(row)
    markdown = "\n".join([
        f"Machine: {machine()['cpu_count']} CPUs, {machine()['date']}. Seeds {args.first_seed}.."
        f"{args.first_seed + args.subjects - 1}; one harmonizer ('fast', subject 0's hrT2 slice).",
        "",
        table(rows, ["model", "stored", "c_ratio", "lp_err", "w1", "seam", "hp", "max_mean_change_pct", "identical"]),
    ])
    print(markdown)
    write_results("dev_orientation", {"rows": rows, "per_subject": {
        f"{m} | {s}": v for (m, s), v in results.items()}}, markdown)


if __name__ == "__main__":
    main()
