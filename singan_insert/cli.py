"""The ``singan-insert`` command line: thin wrappers around the public API.

::

    singan-insert train VOLUME.nii.gz --slice auto --label LABEL.nii.gz --out model/
    singan-insert annotate --model model/ --mask tumor_on_training_slice.png
    singan-insert harmonize --model model/ --background bg.png --composite comp.png --mask m.png --out out.png
    singan-insert insert --model model/ --data-root DIR --out augmented/ --num 2
    singan-insert demo --out demo_output/

Run ``singan-insert COMMAND --help`` for every option.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from singan_insert.checks import MAX_SEED, check_int, check_real, check_seed
from singan_insert.errors import SinganInsertError
from singan_insert.io import read_2d, read_nifti

#: What `harmonize --out` can write (anything else would get PNG bytes under a foreign name).
OUTPUT_2D_EXTENSIONS = (".png", ".npy", ".nii", ".nii.gz")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (the docs' CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="singan-insert",
        description="Realistic tumor insertion with a one-shot SinGAN harmonizer.",
    )
    from singan_insert._version import __version__

    parser.add_argument("--version", action="version", version=f"singan-insert {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a harmonizer on ONE 2D slice",
                                description="Train a harmonizer pyramid on one 2D slice of the target modality.")
    train.add_argument("input", help="NIfTI volume (.nii/.nii.gz), or a 2D image (.png/.npy, or a 2D NIfTI)")
    # --axis and --slice default to None so that a 2D input can refuse them when they are given.
    train.add_argument("--axis", type=int, default=None,
                       help="slice axis of a volume (default: 2; for a one-slice volume, its one-slice axis)")
    train.add_argument("--slice", default=None,
                       help="slice index, or 'auto' = largest label area with --label, else the middle slice "
                            "(default: auto)")
    train.add_argument("--label", help="label volume on the same grid: for --slice auto, and (unless --no-annotate) "
                                       "its tumor on the training slice becomes the model's one-slice annotation "
                                       "(default: none; for a 2D input use --annotation)")
    train.add_argument("--annotate", action=argparse.BooleanOptionalAction, default=None,
                       help="mark the tumor of --label (or --annotation) on the training slice, so that the "
                            "automatic appearance takes B's tumor look from it (default: when a label is given; "
                            "a re-run with neither --label nor --annotation keeps the existing model file's "
                            "annotation)")
    train.add_argument("--annotation", help="for a 2D input: a mask of the tumor on it (.png/.npy, same size; "
                                            "default: none)")
    train.add_argument("--tumor-label", type=int, help="label value of the tumor in --label (default: 1 where "
                                                       "present, else any non-zero)")
    train.add_argument("--crop", type=int, nargs=4, metavar=("ROW0", "ROW1", "COL0", "COL1"),
                       help="crop box in slice pixels, start included and stop excluded as in "
                            "slice[ROW0:ROW1, COL0:COL1] (default: the whole slice)")
    train.add_argument("--modality", help="modality name stored in the model, e.g. hrT2 (default: none)")
    train.add_argument("--preset", default="fast", choices=["fast", "reference", "tiny"],
                       help="fast (default: minutes on a CPU), reference (the official SinGAN schedule), "
                            "tiny (seconds, for tests)")
    train.add_argument("--iterations", type=_positive_int,
                       help="override the preset's iterations per scale (>= 1; 0 is refused, not ignored; "
                            "default: the preset's)")
    train.add_argument("--device", default="auto",
                       help="auto (default: CUDA if available), cpu, cuda, cuda:1 ...")
    train.add_argument("--seed", type=_seed, default=0, help=f"seed of every random draw, 0..{MAX_SEED} (default: 0)")
    train.add_argument("--out", required=True, help="output folder (re-running on it resumes)")
    train.add_argument("--no-samples", action="store_true",
                       help="do not write the per-scale sample PNGs (default: they are written)")

    annotate = commands.add_parser(
        "annotate", help="mark (or unmark) the tumor on a trained model's training slice",
        description="Add the one-slice tumor annotation to a trained model, no retraining: the automatic "
                    "appearance then takes B's tumor level, spread and texture from it.")
    annotate.add_argument("--model", required=True, help="model file or training output folder")
    what = annotate.add_mutually_exclusive_group(required=True)
    what.add_argument("--mask", help="tumor mask of the training slice (.png/.npy/2D .nii.gz; non-zero = tumor), "
                                     "on the slice as trained (after any crop)")
    what.add_argument("--remove", action="store_true", help="remove the model's annotation")
    annotate.add_argument("--label-value", type=int, default=None,
                          help="with a label map of several structures as --mask: the tumor's value (crossMoDA: 1); "
                               "default: every non-zero pixel, refused when the map holds several labels")
    annotate.add_argument("--out", help="write the annotated model to this file, or into this folder (an existing "
                                        "one, or a name ending in '/'); default: replace the model file, "
                                        "atomically")

    harmonize = commands.add_parser("harmonize", help="harmonize one 2D composite + mask",
                                    description="Harmonize one pasted tumor in a 2D slice (PNG, NPY or 2D NIfTI).")
    harmonize.add_argument("--model", required=True, help="model file or training output folder")
    harmonize.add_argument("--background", required=True, help="the slice without the paste")
    harmonize.add_argument("--composite", required=True, help="the slice with the pasted tumor")
    harmonize.add_argument("--mask", required=True, help="mask of the paste (non-zero = tumor)")
    harmonize.add_argument("--out", required=True, help=f"output file ({', '.join(OUTPUT_2D_EXTENSIONS)})")
    harmonize.add_argument("--start-scale", type=int,
                           help="injection scale (negative: from the finest; default: the model's)")
    harmonize.add_argument("--spacing", type=_positive_float, nargs=2, metavar=("ROW_MM", "COL_MM"),
                           help="pixel size of the slice (default: read from NIfTI, else the model's)")
    harmonize.add_argument("--dilation-mm", type=_non_negative_float, default=1.0,
                           help="blend weight is 1 up to this distance from the mask (default: 1.0)")
    harmonize.add_argument("--feather-mm", type=_non_negative_float, default=2.0,
                           help="width of the smooth fall-off of the blend weight (default: 2.0)")
    harmonize.add_argument("--seed", type=_seed, default=0, help=f"noise seed, 0..{MAX_SEED} (default: 0)")
    harmonize.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda ...")

    from singan_insert.batch import add_insert_arguments

    insert = commands.add_parser("insert", help="insert harmonized tumors into volumes (offline augmentation)",
                                 description="Write tumor-augmented copies of target volumes.")
    add_insert_arguments(insert)

    demo = commands.add_parser("demo", help="the whole job on built-in simulated data",
                               description="Simulate subjects, train a harmonizer, insert tumors, write "
                                           "NIfTI files, a Fig.-2-style panel and a metrics summary.")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--subjects", type=_positive_int, default=3, help="simulated subjects to augment (default: 3)")
    demo.add_argument("--preset", default="fast", choices=["fast", "reference", "tiny"],
                      help="training preset of the harmonizer (default: fast)")
    demo.add_argument("--iterations", type=_positive_int,
                      help="override the preset's iterations per scale (>= 1; default: the preset's)")
    demo.add_argument("--seed", type=_seed, default=0,
                      help=f"seed of the simulation and training, 0..{MAX_SEED} (default: 0)")
    demo.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda ...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "harmonize":
            return _harmonize(args)
        if args.command == "annotate":
            return _annotate(args)
        if args.command == "insert":
            from singan_insert.batch import run_insert

            return run_insert(args)
        if args.command == "demo":
            from singan_insert.evaluation.demo import run_demo

            run_demo(out_dir=args.out, num_subjects=args.subjects, preset=args.preset,
                     iterations=args.iterations, seed=args.seed, device=args.device)
            return 0
    except SinganInsertError as error:
        print(f"singan-insert {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsingan-insert {args.command}: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def _training_config(preset: str, iterations: int | None):
    from singan_insert.harmonizer.training import TrainingConfig

    # `is not None`: --iterations 0 must reach TrainingConfig's check, not fall back to the preset.
    return TrainingConfig.preset(preset, **({} if iterations is None else {"iterations": iterations}))


def _train(args: argparse.Namespace) -> int:
    from singan_insert.harmonizer.model import MODEL_FILE_NAME
    from singan_insert.harmonizer.training import train_harmonizer
    from singan_insert.io import atomic_write_bytes

    chosen = _training_slice(args)
    from singan_insert.batch import check_writable_folder

    out = Path(args.out)
    check_writable_folder(out)
    print(f"Training on {chosen.provenance} ({chosen.image.shape[0]}x{chosen.image.shape[1]} px, "
          f"spacing {chosen.spacing}) -> {out}")
    annotation = None
    if args.annotation is not None:
        if args.annotate is False:
            raise SinganInsertError("--annotation and --no-annotate contradict each other; drop one.")
        annotation = _crop(args, read_2d(Path(args.annotation), what="annotation")) > 0
    elif args.annotate or (args.annotate is None and chosen.label is not None):
        if chosen.label is None:
            raise SinganInsertError("--annotate needs a tumor mask: --label LABEL.nii.gz with a volume, "
                                    "or --annotation MASK with a 2D image.")
        annotation = chosen.tumor_annotation(args.tumor_label)
    previous = _previous_model(out / MODEL_FILE_NAME)
    model = train_harmonizer(chosen.image, _training_config(args.preset, args.iterations), out_dir=out,
                             seed=args.seed, spacing=chosen.spacing, device=args.device,
                             provenance=chosen.provenance, sample_figures=not args.no_samples,
                             annotation=annotation)
    model_file = out / MODEL_FILE_NAME
    state = (f", with the tumor on its training slice annotated ({int(annotation.sum())} px)"
             if annotation is not None else
             " (no tumor annotation: each tumor's level will be guessed by realism, which gives a tissue's "
             "level; annotate the slice's tumor (--label, or singan-insert annotate) wherever tumors are "
             "brighter or darker than every tissue around them, e.g. enhancing tumors in ceT1)")
    if previous is not None:
        old_bytes, old = previous
        same_run = old.metadata.get("training", {}).get("fingerprint") == model.metadata["training"]["fingerprint"]
        # An annotation added later with `annotate` lives only in the model file, which training
        # rewrites: a re-run that asks for no annotation either way keeps it.
        kept = annotation is None and args.annotate is None and old.tumor_annotation is not None
        if kept:
            if same_run:
                model.annotate(old.tumor_annotation)
                state = (f", keeping the tumor annotation of the existing model file "
                         f"({int((old.tumor_annotation > 0.5).sum())} px at its finest scale; --no-annotate drops it)")
            else:
                kept = False
                state += (" - the previous model file's annotation was drawn for another training run, so it "
                          "was not kept: annotate this model again (singan-insert annotate)")
        if same_run and _same_model(model, old):
            # A re-run of a finished training: the file stays byte for byte what it was, so that
            # nothing made with it (insert's outputs are keyed on its SHA-256) is redone.
            atomic_write_bytes(model_file, old_bytes)
            state += "; the file is unchanged (this training had finished)"
        elif kept:
            model.save(model_file)
    print(f"Saved {model!r} to {model_file}{state}")
    return 0


def _training_slice(args: argparse.Namespace):
    """The ONE training slice the arguments name: cut from a volume, or a 2D image as it is."""
    from singan_insert.harmonizer.training_slice import TrainingSlice, load_training_slice

    path = Path(args.input)
    axis, index = args.axis, args.slice
    if path.name.lower().endswith((".nii", ".nii.gz")):
        shape = _nifti_shape(path)
        if shape is not None and len(shape) == 3 and axis is None and shape.count(1) == 1:
            axis = shape.index(1)  # a one-slice volume: its slice, whatever axis it lies along
        if shape is None or len(shape) != 2:
            index = "auto" if index in (None, "auto") else _int(index, "--slice")
            return load_training_slice(path, 2 if axis is None else axis, index, args.label,
                                       tuple(args.crop) if args.crop else None, args.modality)
    given = [name for name, value in (("--label", args.label), ("--axis", axis), ("--slice", index),
                                      ("--tumor-label", args.tumor_label)) if value is not None]
    if given:
        raise SinganInsertError(
            f"{args.input} is a 2D image, and {', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} "
            "to a 3D volume, to cut its training slice. Train on the image as it is, with --annotation MASK "
            "(.png/.npy, same size, non-zero = tumor) to mark its tumor; or pass the 3D volume instead.")
    image = _crop(args, read_2d(path, what="training slice"))
    return TrainingSlice(image, _nifti_spacing(path), {"source": path.name, "modality": args.modality,
                                                       "crop": args.crop})


def _crop(args: argparse.Namespace, image):
    from singan_insert.harmonizer.training_slice import apply_crop

    return apply_crop(image, tuple(args.crop) if args.crop else None)


def _nifti_shape(path: Path) -> tuple[int, ...] | None:
    """A NIfTI file's data shape from its header (axes of length 1 past the third dropped), or
    ``None`` when the header cannot be read (the full reader then says why)."""
    try:
        import nibabel as nib

        shape = tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception:
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _previous_model(path: Path):
    """``(bytes, Harmonizer)`` of an existing model file, or ``None`` (none, or unreadable)."""
    from singan_insert.harmonizer.model import Harmonizer

    if not path.is_file():
        return None
    try:
        return path.read_bytes(), Harmonizer.load(path, device="cpu")
    except SinganInsertError as error:
        print(f"note: the existing {path} is unreadable ({error}); training replaces it.")
        return None


def _same_model(a, b) -> bool:
    """Whether two harmonizers hold the same weights, annotation and description (the time and
    device a run took, and the version that saved it, apart)."""
    import torch

    def described(model) -> str:
        training = {k: v for k, v in model.metadata.get("training", {}).items()
                    if k not in ("seconds_this_run", "device", "torch_version")}
        metadata = {k: v for k, v in model.metadata.items() if k != "package_version"}
        annotation = None if model.tumor_annotation is None else model.tumor_annotation.cpu().numpy().tolist()
        return json.dumps([{**metadata, "training": training}, model.spacing, annotation],
                          sort_keys=True, default=str)

    weights_a, weights_b = a.pyramid.state_dict(), b.pyramid.state_dict()
    return described(a) == described(b) and weights_a.keys() == weights_b.keys() and all(
        torch.equal(weights_a[k].cpu(), weights_b[k].cpu()) for k in weights_a)


def _annotate(args: argparse.Namespace) -> int:
    import numpy as np

    from singan_insert.batch import resolve_model
    from singan_insert.harmonizer.model import MODEL_FILE_NAME, Harmonizer

    source = resolve_model(args.model)
    model = Harmonizer.load(source, device="cpu")
    if args.remove:
        model.annotate(None)
    else:
        mask = read_2d(Path(args.mask), what="tumor mask")
        if args.label_value is not None:
            if not (mask == args.label_value).any():
                raise SinganInsertError(f"The mask {args.mask} holds no pixel of label {args.label_value}; "
                                        f"it holds {', '.join(f'{v:g}' for v in np.unique(mask)[:10])}.")
            mask = mask == args.label_value
        model.annotate(mask)
    out = source
    if args.out:
        out = Path(args.out)
        # "newdir/" names a folder, as in cp and rsync, even before it exists.
        if args.out.endswith(("/", os.sep)) or out.is_dir():
            from singan_insert.batch import check_writable_folder

            check_writable_folder(out)
            out = out / MODEL_FILE_NAME
    out = model.save(out)
    state = "without an annotation" if args.remove else \
        f"with {int((model.tumor_annotation > 0.5).sum())} px of tumor annotated at its finest scale"
    print(f"Wrote {out} ({state})")
    return 0


def _harmonize(args: argparse.Namespace) -> int:
    import numpy as np

    from singan_insert.batch import resolve_model
    from singan_insert.harmonizer.model import Harmonizer

    _check_2d_output(args.out)
    model = Harmonizer.load(resolve_model(args.model), device=args.device)
    background = read_2d(Path(args.background), what="background")
    composite = read_2d(Path(args.composite), what="composite")
    spacing = args.spacing or _nifti_spacing(Path(args.background))
    mask = (read_2d(Path(args.mask), what="mask") > 0).astype(np.float32)
    out = model.harmonize(background, composite, mask, args.start_scale, spacing=spacing,
                          dilation_mm=args.dilation_mm, feather_mm=args.feather_mm, seed=args.seed)
    write_2d(Path(args.out), out, reference=Path(args.background))
    print(f"Wrote {args.out}")
    return 0


def _check_2d_output(name: str) -> None:
    if not name.lower().endswith(OUTPUT_2D_EXTENSIONS):
        raise SinganInsertError(f"--out {name!r}: cannot write that kind of file; name it with one of "
                                f"{', '.join(OUTPUT_2D_EXTENSIONS)} (PNG holds 8-bit values; NPY and NIfTI "
                                "keep the intensities).")


def _nifti_spacing(path: Path):
    """In-plane pixel size of a 2D (or single-slice) NIfTI, else None."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    image = read_nifti(path, what="background", ndim=None)
    zooms = [float(z) for z, n in zip(image.header.get_zooms(), image.shape) if n > 1]
    return tuple(zooms[:2]) if len(zooms) >= 2 else None


def _argument_type(check, *bounds, **options):
    """An argparse ``type`` from a :mod:`singan_insert.checks` function (argparse's own error and exit 2)."""
    def parse(text: str):
        try:
            number = float(text) if check is check_real else int(text)
            return check(number, "the value", *bounds, **options)
        except (ValueError, SinganInsertError) as error:
            kind = "a number" if check is check_real else "an integer"
            raise argparse.ArgumentTypeError(str(error) if isinstance(error, SinganInsertError)
                                             else f"{text!r} is not {kind}") from None
    parse.__name__ = check.__name__.replace("check_", "")
    return parse


_positive_int = _argument_type(check_int, 1)
_seed = _argument_type(check_seed)
_positive_float = _argument_type(check_real, 0, open_minimum=True)
_non_negative_float = _argument_type(check_real, 0)


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SinganInsertError(f"{name} must be an integer or 'auto', got {value!r}.") from None


def write_2d(path: Path, image, reference: Path | None = None) -> None:
    """Write a 2D result as NPY, NIfTI (with the reference's affine, header and shape if it is
    NIfTI) or 8-bit PNG."""
    import numpy as np

    from singan_insert.io import atomic_write_bytes, atomic_write_png, write_nifti

    name = path.name.lower()
    if name.endswith(".npy"):
        import io

        buffer = io.BytesIO()
        np.save(buffer, image)
        atomic_write_bytes(path, buffer.getvalue())
    elif name.endswith((".nii", ".nii.gz")):
        affine, header = np.eye(4), None
        if reference is not None and reference.name.lower().endswith((".nii", ".nii.gz")):
            # The reference's header and shape: a (H, W, 1) slice stays one, with its units and codes.
            stored = read_nifti(reference, what="reference", ndim=None)
            affine, header = stored.affine, stored.header
            if int(np.prod(stored.shape)) == image.size:
                image = image.reshape(stored.shape)
        write_nifti(path, image, affine, header=header)
    elif name.endswith(".png"):
        if image.min() < 0 or image.max() > 255:
            # 8-bit PNG cannot hold these values: rescale (and say so) rather than saturate.
            low, high = float(image.min()), float(image.max())
            print(f"note: values {low:g}..{high:g} rescaled to 0..255 for the PNG; "
                  "write .npy or .nii.gz to keep the intensities.", file=sys.stderr)
            image = (image - low) / max(high - low, 1e-12) * 255
        clipped = np.clip(np.round(image), 0, 255).astype(np.uint8)
        atomic_write_png(path, clipped)
    else:
        _check_2d_output(str(path))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
