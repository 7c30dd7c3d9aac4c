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
import sys
from pathlib import Path
from typing import Sequence

from singan_insert.checks import MAX_SEED, check_int, check_real, check_seed
from singan_insert.errors import SinganInsertError
from singan_insert.io import read_2d, read_nifti


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
    train.add_argument("input", help="NIfTI volume (.nii/.nii.gz), or a 2D image (.png/.npy)")
    train.add_argument("--axis", type=int, default=2, help="slice axis of a volume (default: 2)")
    train.add_argument("--slice", default="auto",
                       help="slice index, or 'auto' = largest label area with --label, else the middle slice")
    train.add_argument("--label", help="label volume on the same grid: for --slice auto, and (unless --no-annotate) "
                                       "its tumor on the training slice becomes the model's one-slice annotation")
    train.add_argument("--annotate", action=argparse.BooleanOptionalAction, default=None,
                       help="mark the tumor of --label (or --annotation) on the training slice, so that the "
                            "automatic appearance takes B's tumor look from it (default: when a label is given)")
    train.add_argument("--annotation", help="for a 2D input: a mask of the tumor on it (.png/.npy, same size)")
    train.add_argument("--tumor-label", type=int, help="label value of the tumor in --label (default: 1 where "
                                                       "present, else any non-zero)")
    train.add_argument("--crop", type=int, nargs=4, metavar=("ROW0", "ROW1", "COL0", "COL1"),
                       help="crop box in slice pixels")
    train.add_argument("--modality", help="modality name stored in the model (e.g. hrT2)")
    train.add_argument("--preset", default="fast", choices=["fast", "reference", "tiny"],
                       help="fast (default: minutes on a CPU), reference (the official SinGAN schedule), "
                            "tiny (seconds, for tests)")
    train.add_argument("--iterations", type=_positive_int,
                       help="override the preset's iterations per scale (>= 1; 0 is refused, not ignored)")
    train.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    train.add_argument("--seed", type=_seed, default=0, help=f"seed of every random draw, 0..{MAX_SEED} (default: 0)")
    train.add_argument("--out", required=True, help="output folder (re-running on it resumes)")
    train.add_argument("--no-samples", action="store_true", help="do not write the per-scale sample PNGs")

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
    annotate.add_argument("--out", help="write the annotated model here (default: replace the model file, atomically)")

    harmonize = commands.add_parser("harmonize", help="harmonize one 2D composite + mask",
                                    description="Harmonize one pasted tumor in a 2D slice (PNG, NPY or 2D NIfTI).")
    harmonize.add_argument("--model", required=True, help="model file or training output folder")
    harmonize.add_argument("--background", required=True, help="the slice without the paste")
    harmonize.add_argument("--composite", required=True, help="the slice with the pasted tumor")
    harmonize.add_argument("--mask", required=True, help="mask of the paste (non-zero = tumor)")
    harmonize.add_argument("--out", required=True, help="output file (.png, .npy or .nii.gz)")
    harmonize.add_argument("--start-scale", type=int, help="injection scale (negative: from the finest)")
    harmonize.add_argument("--spacing", type=_positive_float, nargs=2, metavar=("ROW_MM", "COL_MM"),
                           help="pixel size of the slice (default: read from NIfTI, else the model's)")
    harmonize.add_argument("--dilation-mm", type=_non_negative_float, default=1.0,
                           help="blend weight is 1 up to this distance from the mask (default: 1.0)")
    harmonize.add_argument("--feather-mm", type=_non_negative_float, default=2.0,
                           help="width of the smooth fall-off of the blend weight (default: 2.0)")
    harmonize.add_argument("--seed", type=_seed, default=0, help=f"noise seed, 0..{MAX_SEED} (default: 0)")
    harmonize.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda ...")

    from singan_insert.batch import add_insert_arguments

    insert = commands.add_parser("insert", help="insert harmonized tumors into volumes (offline augmentation)",
                                 description="Write tumor-augmented copies of target volumes.")
    add_insert_arguments(insert)

    demo = commands.add_parser("demo", help="the whole job on built-in simulated data",
                               description="Simulate subjects, train a harmonizer, insert tumors, write "
                                           "NIfTI files, a Fig.-2-style panel and a metrics summary.")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--subjects", type=_positive_int, default=3, help="simulated subjects to augment")
    demo.add_argument("--preset", default="fast", choices=["fast", "reference", "tiny"],
                      help="training preset of the harmonizer (default: fast)")
    demo.add_argument("--iterations", type=_positive_int, help="override the preset's iterations per scale (>= 1)")
    demo.add_argument("--seed", type=_seed, default=0,
                      help=f"seed of the simulation and training, 0..{MAX_SEED} (default: 0)")
    demo.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda ...")
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
    from singan_insert.harmonizer.training import train_harmonizer
    from singan_insert.harmonizer.training_slice import TrainingSlice, apply_crop, load_training_slice

    path = Path(args.input)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        index = args.slice if args.slice == "auto" else _int(args.slice, "--slice")
        chosen = load_training_slice(path, args.axis, index, args.label, tuple(args.crop) if args.crop else None,
                                     args.modality)
    else:
        image = apply_crop(read_2d(path, what="training slice"), tuple(args.crop) if args.crop else None)
        chosen = TrainingSlice(image, None, {"source": path.name, "modality": args.modality,
                                             "crop": args.crop})
    from singan_insert.batch import check_writable_folder

    out = Path(args.out)
    check_writable_folder(out)
    print(f"Training on {chosen.provenance} ({chosen.image.shape[0]}x{chosen.image.shape[1]} px, "
          f"spacing {chosen.spacing}) -> {out}")
    annotation = None
    if args.annotation is not None:
        if args.annotate is False:
            raise SinganInsertError("--annotation and --no-annotate contradict each other; drop one.")
        annotation = apply_crop(read_2d(Path(args.annotation), what="annotation"),
                                tuple(args.crop) if args.crop else None) > 0
    elif args.annotate or (args.annotate is None and chosen.label is not None):
        if chosen.label is None:
            raise SinganInsertError("--annotate needs a tumor mask: --label LABEL.nii.gz with a volume, "
                                    "or --annotation MASK with a 2D image.")
        annotation = chosen.tumor_annotation(args.tumor_label)
    model = train_harmonizer(chosen.image, _training_config(args.preset, args.iterations), out_dir=out,
                             seed=args.seed, spacing=chosen.spacing, device=args.device,
                             provenance=chosen.provenance, sample_figures=not args.no_samples,
                             annotation=annotation)
    print(f"Saved {model!r} to {out / 'harmonizer.safetensors'}"
          + (f", with the tumor on its training slice annotated ({int(annotation.sum())} px)"
             if annotation is not None else " (no tumor annotation)"))
    return 0


def _annotate(args: argparse.Namespace) -> int:
    import numpy as np

    from singan_insert.harmonizer.model import MODEL_FILE_NAME, Harmonizer

    source = Path(args.model)
    source = source / MODEL_FILE_NAME if source.is_dir() else source
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
    out = Path(args.out) if args.out else source
    out = model.save(out / MODEL_FILE_NAME if out.is_dir() else out)
    state = "without an annotation" if args.remove else \
        f"with {int((model.tumor_annotation > 0.5).sum())} px of tumor annotated at its finest scale"
    print(f"Wrote {out} ({state})")
    return 0


def _harmonize(args: argparse.Namespace) -> int:
    import numpy as np

    from singan_insert.harmonizer.model import Harmonizer

    model = Harmonizer.load(args.model, device=args.device)
    background = read_2d(Path(args.background), what="background")
    composite = read_2d(Path(args.composite), what="composite")
    spacing = args.spacing or _nifti_spacing(Path(args.background))
    mask = (read_2d(Path(args.mask), what="mask") > 0).astype(np.float32)
    out = model.harmonize(background, composite, mask, args.start_scale, spacing=spacing,
                          dilation_mm=args.dilation_mm, feather_mm=args.feather_mm, seed=args.seed)
    write_2d(Path(args.out), out, reference=Path(args.background))
    print(f"Wrote {args.out}")
    return 0


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
    """Write a 2D result as NPY, NIfTI (with the reference's affine if it is NIfTI) or 8-bit PNG."""
    import numpy as np

    from singan_insert.io import atomic_write_bytes, atomic_write_png, write_nifti

    name = path.name.lower()
    if name.endswith(".npy"):
        import io

        buffer = io.BytesIO()
        np.save(buffer, image)
        atomic_write_bytes(path, buffer.getvalue())
    elif name.endswith((".nii", ".nii.gz")):
        affine = np.eye(4)
        if reference is not None and reference.name.lower().endswith((".nii", ".nii.gz")):
            affine = read_nifti(reference, what="reference", ndim=None).affine
        write_nifti(path, image, affine)
    else:
        if image.min() < 0 or image.max() > 255:
            # 8-bit PNG cannot hold these values: rescale (and say so) rather than saturate.
            low, high = float(image.min()), float(image.max())
            print(f"note: values {low:g}..{high:g} rescaled to 0..255 for the PNG; "
                  "write .npy or .nii.gz to keep the intensities.", file=sys.stderr)
            image = (image - low) / max(high - low, 1e-12) * 255
        clipped = np.clip(np.round(image), 0, 255).astype(np.uint8)
        atomic_write_png(path, clipped)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
