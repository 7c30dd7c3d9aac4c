"""More B' variants, and pix2pix runs with their own seed, beside the workflow's (benchmark rows).

The workflow (:mod:`singan_insert.pipeline.workflow`) writes two B' variants, ``harmonized``
(ours) and ``naive`` (the same pastes, not harmonized), and trains one pix2pix per variant
with the pipeline's seed. To judge them, ``benchmarks/bench_pipeline.py`` adds:

``oracle``
    each pasted tumor replaced by the simulator's TRUE hrT2 rendering of that subject (its own
    tumor, at the same place), blended into the fake hrT2 with the harmonizer's weight of the
    harmonized twin (:func:`singan_insert.evaluation.baselines.oracle_paste`): the tumor AND
    the 1-3 mm of B around it are right. The truth is first expressed in the fake hrT2's units
    (its robust range, :math:`p_{0.5}..p_{99.5}` on the working grid, mapped affinely onto the
    fake's: the CycleGAN's output units need not be the scanner's, and every later stage
    normalises each volume by such percentiles anyway). Only for data from
    :func:`~singan_insert.datasets.crossmoda.simulate_crossmoda`, whose subjects can be rendered
    again (case ``N`` is seed ``1000 * seed + N``).
``gba``
    GBA-style (the authors' follow-up): no tumor is pasted from A; the translated tumor of the
    fake hrT2 is contrast-scaled in place by :math:`\\lambda` drawn from ``{0.5, 0.8, 1.5}``
    (seeded per case), i.e. :math:`v' = p_{lo} + \\lambda (v - p_{lo})` with :math:`p_{lo}` the
    volume's 0.5th percentile (the ``"normalized"`` mapping of the fake hrT2 onto itself), then
    harmonized with the harmonized twin's other parameters (start scale, noise seed, blend).
``unannotated``
    the harmonized twin's insertion replayed (same parameters and seeds) by the same harmonizer
    without its one-slice tumor annotation (:meth:`~singan_insert.Harmonizer.annotate`): what
    the annotation adds downstream. Identical to ``harmonized`` when the model has none.
``no_rim``
    the harmonized twin's insertion replayed without B's annotated rim (``rim=False``,
    :func:`~singan_insert.insertion.annotation.render_rim`): what the rim adds downstream.
    Identical to ``harmonized`` when the model has no annotation.
``fixed_rim``
    the harmonized twin's insertion replayed with the annotated rim's widths in mm
    (``rim_scale=1``) instead of widths that follow the tumor's size
    (:func:`~singan_insert.insertion.annotation.rim_scale`): what the scaling adds downstream.
``no_pyramid``
    the harmonized twin's insertion replayed without the generators (every other step, the
    level, the rim and the texture, kept): what the pyramid itself adds.
``tumor_harmonized``
    the harmonized twin's insertion replayed with ``harmonize_tumor=True``: the tumor's voxels
    take the pyramid's output, as in the paper, instead of keeping their chosen appearance.
``narrow_blend``
    the harmonized twin's insertion replayed with a narrower blend (``dilation_mm=0``,
    ``feather_mm=1``): the pyramid's output replaces less of the surroundings.
``replayed``, ``replayed_naive``
    the harmonized twin's insertion made again by the library's current code, same parameters
    and seeds (the rim scale, which the workflow leaves to the code, resolved again), and its
    composite (the naive paste, as the workflow writes ``naive``): identical
    to ``harmonized`` and ``naive`` unless the insertion's code changed since the folder was
    filled, so that a change can be judged downstream on a kept folder.

Every variant shares the harmonized twin's stems (``<name>_aug<k>``), label maps and records'
``"case"`` (so pix2pix pairs each B' with the same ceT1). :func:`train_pix2pix_seeded` trains
pix2pix on any variant with any seed (``<work>/pix2pix/<variant>_seed<s>/``), and
:func:`segment_validation_seeded` translates and segments the validation scans with it
(``<work>/predictions/<variant>_seed<s>/``, on each scan's own grid). Everything skips what
is already written, as the workflow does, unless its inputs changed: every variant record
stores the checksum of its harmonized twin's record, every seeded pix2pix folder that of its
B' variant (``inputs.json``), every seeded prediction folder that of its pix2pix model; what
no longer matches is made again. What these checksums cannot see is a change of the library's
own code between two runs: after an upgrade, delete the variant folders (or run the benchmark
with ``--fresh``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from singan_insert.errors import SinganInsertError
from singan_insert.pipeline.workflow import (
    TUMOR_LABEL,
    CrossModaData,
    CrossModaPipeline,
    read_volume,
    resample_image,
    write_volume,
)

if TYPE_CHECKING:
    from singan_insert.datasets.phantom import SimulatedSubject

__all__ = [
    "GBA_CONTRASTS",
    "VARIANTS",
    "segment_validation_seeded",
    "simulated_subject",
    "train_pix2pix_seeded",
    "write_gba_bprime",
    "write_oracle_bprime",
    "write_replayed_bprime",
    "write_narrow_blend_bprime",
    "write_no_pyramid_bprime",
    "write_fixed_rim_bprime",
    "write_no_rim_bprime",
    "write_tumor_harmonized_bprime",
    "write_unannotated_bprime",
]

VARIANTS = ("harmonized", "naive", "oracle", "gba", "unannotated", "no_rim", "fixed_rim", "no_pyramid",
            "tumor_harmonized", "narrow_blend", "replayed", "replayed_naive")
GBA_CONTRASTS = (0.5, 0.8, 1.5)
_NIFTI = ".nii.gz"


def simulated_subject(data: CrossModaData, name: str) -> "SimulatedSubject":
    """The simulated subject behind case ``name`` of a :func:`simulate_crossmoda` data set."""
    from singan_insert.datasets.phantom import simulate_subject

    marker = data.root / "simulation.json"
    if not marker.is_file():
        raise SinganInsertError(
            f"{data.root} is not a simulated data set (no simulation.json): the oracle needs the "
            "simulator's true hrT2, which real data do not have.")
    arguments = json.loads(marker.read_text())["arguments"]
    try:
        number = int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise SinganInsertError(f"Case {name!r} is not named <prefix>_<N> as simulate_crossmoda names them.") from None
    return simulate_subject(1000 * int(arguments["seed"]) + number, tuple(arguments["shape"]),
                            tumor_volume_cm3=tuple(arguments["tumor_volume_cm3"]))


def _harmonized_records(pipeline: CrossModaPipeline) -> list[Path]:
    records = sorted(pipeline.bprime_dir("harmonized").glob("*_aug*.json"))
    if not records:
        raise SinganInsertError("No harmonized B' yet: run the insertion step (insert_tumors) first.")
    return records


def _outputs(pipeline: CrossModaPipeline, variant: str, record: Path) -> dict[str, Path]:
    stem = record.name[:-len(".json")]
    folder = pipeline.bprime_dir(variant)
    return {"image": folder / f"{stem}_image{_NIFTI}", "label": folder / f"{stem}_label{_NIFTI}",
            "record": folder / f"{stem}.json", "twin_label": record.with_name(f"{stem}_label{_NIFTI}"),
            "twin_record": record}


def _write(paths: dict[str, Path], image: np.ndarray, label: np.ndarray, affine: np.ndarray, record: dict) -> None:
    from singan_insert.io import atomic_write_bytes

    write_volume(paths["image"], image.astype(np.float32), affine)
    write_volume(paths["label"], label, affine)
    # The record last: it marks the case done, with the checksum of the twin it was made from.
    atomic_write_bytes(paths["record"], json.dumps({**record, "twin_checksum": _digest([paths["twin_record"]])},
                                                   indent=2, default=str).encode())


def _write_from_twins(
    pipeline: CrossModaPipeline, variant: str,
    make: Callable[[dict, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, dict]],
) -> list[Path]:
    """``variant`` of every harmonized twin whose variant is missing or stale: the image
    ``make(twin_record, fake_b, affine, twin_label) -> (image, record_update)`` with the twin's
    label map; the image paths of all twins."""
    written = []
    for record_path in _harmonized_records(pipeline):
        paths = _outputs(pipeline, variant, record_path)
        if not _is_current(paths["record"], record_path):
            record = json.loads(record_path.read_text())
            fake, affine = read_volume(record["case"]["target"])
            label, _ = read_volume(paths["twin_label"])
            image, update = make(record, fake, affine, label)
            _write(paths, image, label, affine, {**record, "variant": variant, **update})
        written.append(paths["image"])
    return written


def _digest(files: Sequence[Path]) -> str:
    """SHA-256 (first 16 hex digits) over ``files`` in the given order: a NIfTI file's voxels and
    affine (its gzip header holds a time stamp, so equal images rewritten would differ), the bytes
    of any other."""
    import hashlib

    digest = hashlib.sha256()
    for path in map(Path, files):
        digest.update(path.name.encode())
        if path.name.endswith((".nii", _NIFTI)):
            image, affine = read_volume(path)
            digest.update(np.ascontiguousarray(image).tobytes())
            digest.update(str(image.dtype).encode() + np.asarray(affine, np.float64).tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _is_current(record: Path, twin_record: Path) -> bool:
    """Whether a variant's case exists and was made from the harmonized twin as it is now."""
    if not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("twin_checksum") == _digest([twin_record])
    except (OSError, ValueError):
        return False


def write_oracle_bprime(pipeline: CrossModaPipeline) -> list[Path]:
    """The ``oracle`` variant of every harmonized B' (see the module docstring); image paths."""
    from singan_insert.evaluation.baselines import oracle_paste
    from singan_insert.insertion.placement import spacing_from_affine

    def oracle(record: dict, fake: np.ndarray, affine: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, dict]:
        subject = simulated_subject(pipeline.data, record["case"]["name"])
        truth = _in_units_of(resample_image(subject.image_b, subject.affine_b, affine, fake.shape), fake)
        parameters = record["parameters"]
        image = oracle_paste(fake.astype(np.float32), truth, label == TUMOR_LABEL, axis=int(parameters["axis"]),
                             spacing=spacing_from_affine(affine), dilation_mm=parameters["dilation_mm"],
                             feather_mm=parameters["feather_mm"])
        return image, {}

    return _write_from_twins(pipeline, "oracle", oracle)


def _in_units_of(image: np.ndarray, reference: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    """``image`` mapped affinely so that its robust range lands on ``reference``'s."""
    low, high = np.percentile(image, percentiles)
    ref_low, ref_high = np.percentile(reference, percentiles)
    if not high > low:
        raise SinganInsertError("The true hrT2 is constant on the working grid; cannot express it in B' units.")
    return (ref_low + (image - low) * (ref_high - ref_low) / (high - low)).astype(np.float32)


def write_gba_bprime(pipeline: CrossModaPipeline, contrasts: Sequence[float] = GBA_CONTRASTS) -> list[Path]:
    """The ``gba`` variant of every harmonized B' (see the module docstring); image paths."""
    from singan_insert.batch import derived_seed
    from singan_insert.insertion.insert import InsertionParameters, insert_tumor
    from singan_insert.insertion.placement import SourceTumor
    from singan_insert.insertion.model_cache import load_harmonizer
    from singan_insert.insertion.sampling import check_contrast

    if not contrasts:
        raise SinganInsertError("GBA needs at least one contrast factor.")
    contrasts = [check_contrast(c, "GBA contrast factor") for c in contrasts]
    harmonizer = None

    def gba(record: dict, fake: np.ndarray, affine: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, dict]:
        nonlocal harmonizer
        rng = np.random.default_rng(derived_seed(pipeline.settings.seed, record["case"]["name"],
                                                 int(record.get("augmentation", 0))))
        parameters = replace(InsertionParameters.from_dict(record["parameters"]),
                             contrast=float(rng.choice(list(contrasts))), intensity_mode="normalized",
                             appearance="fixed", texture=None, rim=None, rim_scale=None, harmonize_tumor=None,
                             placement=None)
        harmonizer = harmonizer or load_harmonizer(record["model_file"])
        # The translated tumor is its own source, in place: the mapping only scales its contrast.
        source = SourceTumor.from_arrays(fake.astype(np.float32), (label == TUMOR_LABEL).astype(np.uint8),
                                         affine, label_value=1)
        result = insert_tumor(fake.astype(np.float32), affine, source, harmonizer, parameters)
        return result.image, {"parameters": result.record["parameters"]}

    return _write_from_twins(pipeline, "gba", gba)


def write_unannotated_bprime(pipeline: CrossModaPipeline) -> list[Path]:
    """The ``unannotated`` variant of every harmonized B' (see the module docstring); image paths."""
    return _replay(pipeline, "unannotated", annotated=False)


def write_no_rim_bprime(pipeline: CrossModaPipeline) -> list[Path]:
    """The ``no_rim`` variant of every harmonized B' (see the module docstring); image paths."""
    return _replay(pipeline, "no_rim", rim=False)


def write_fixed_rim_bprime(pipeline: CrossModaPipeline) -> list[Path]:
    """The ``fixed_rim`` variant of every harmonized B' (see the module docstring); image paths."""
    return _replay(pipeline, "fixed_rim", rim_scale=1.0)


def write_no_pyramid_bprime(pipeline: CrossModaPipeline) -> list[Path]:
    """The ``no_pyramid`` variant of every harmonized B' (see the module docstring); image paths."""
    return _replay(pipeline, "no_pyramid", pyramid=False)


def write_tumor_harmonized_bprime(pipeline: CrossModaPipeline) -> list[Path]:
    """The ``tumor_harmonized`` variant of every harmonized B' (see the module docstring); image paths."""
    return _replay(pipeline, "tumor_harmonized", harmonize_tumor=True)


def write_narrow_blend_bprime(pipeline: CrossModaPipeline, dilation_mm: float = 0.0,
                              feather_mm: float = 1.0) -> list[Path]:
    """The ``narrow_blend`` variant of every harmonized B' (see the module docstring); image paths."""
    return _replay(pipeline, "narrow_blend", dilation_mm=dilation_mm, feather_mm=feather_mm)


def write_replayed_bprime(pipeline: CrossModaPipeline) -> list[Path]:
    """The ``replayed`` and ``replayed_naive`` variants of every harmonized B' (see the module
    docstring); the ``replayed`` image paths."""
    # Always made again: what is there may be an earlier code's. The pipeline never sets the rim
    # scale, so it is resolved again, by the current code, rather than replayed as recorded.
    return _replay(pipeline, "replayed", redo=True, composite_variant="replayed_naive", rim_scale=None)


def _replay(pipeline: CrossModaPipeline, variant: str, annotated: bool = True, pyramid: bool = True,
            redo: bool = False, composite_variant: str | None = None, **overrides) -> list[Path]:
    """Every harmonized twin's insertion again, same parameters and seeds but ``overrides``
    (``annotated=False``: by the model without its annotation; ``pyramid=False``: without the
    generators; ``redo``: also where the variant is already written; ``composite_variant``: the
    insertions' composites, i.e. their naive pastes, written as that variant too)."""
    from singan_insert.harmonizer.model import Harmonizer
    from singan_insert.insertion import insert as insertion
    from singan_insert.insertion.insert import InsertionParameters, insert_tumor
    from singan_insert.insertion.placement import SourceTumor

    harmonizer = None
    written = []
    for record_path in _harmonized_records(pipeline):
        paths = _outputs(pipeline, variant, record_path)
        composite_paths = _outputs(pipeline, composite_variant, record_path) if composite_variant else None
        if redo or not _is_current(paths["record"], record_path) or (
                composite_paths is not None and not _is_current(composite_paths["record"], record_path)):
            record = json.loads(record_path.read_text())
            if harmonizer is None:  # a private copy: the cached, annotated model stays as it is
                harmonizer = Harmonizer.load(record["model_file"])
                if not annotated:
                    harmonizer.annotate(None)
            case = record["case"]
            target, affine = read_volume(case["target"])
            source = SourceTumor.from_files(case["source_image"], case["source_label"], label_value=TUMOR_LABEL)
            parameters = replace(InsertionParameters.from_dict(record["parameters"]), **overrides)
            if not annotated:  # what the annotation decided is left to the unannotated model's defaults
                parameters = replace(parameters, **{"rim": None, "rim_scale": None, "harmonize_tumor": None, **overrides})
            saved, insertion._ABLATE_PYRAMID = insertion._ABLATE_PYRAMID, not pyramid
            try:
                result = insert_tumor(target.astype(np.float32), affine, source, harmonizer, parameters,
                                      return_composite=composite_variant is not None)
            finally:
                insertion._ABLATE_PYRAMID = saved
            made = {"parameters": result.record["parameters"], "appearance": result.record["appearance"]}
            if composite_paths is not None:
                _write(composite_paths, result.composite, result.label, affine,
                       {**record, **made, "variant": composite_variant, "naive_paste": True})
            _write(paths, result.image, result.label, affine, {**record, **made, "variant": variant})
        written.append(paths["image"])
    return written


def pix2pix_seeded_dir(pipeline: CrossModaPipeline, variant: str, seed: int) -> Path:
    return pipeline.work / "pix2pix" / f"{variant}_seed{int(seed)}"


def train_pix2pix_seeded(pipeline: CrossModaPipeline, variant: str, seed: int):
    """pix2pix :math:`B' \\to A` on ``variant``'s pairs, the pipeline's settings but ``seed``."""
    from singan_insert.io import atomic_write_bytes
    from singan_insert.stages.pix2pix import MODEL_NAME, Pix2Pix, train_pix2pix

    _check_variant(variant)
    folder = pix2pix_seeded_dir(pipeline, variant, seed)
    records = sorted(pipeline.bprime_dir(variant).glob("*_aug*.json"))
    if not records:
        raise SinganInsertError(
            f"No B' volumes in {pipeline.bprime_dir(variant)}; write the {variant!r} variant first.")
    pairs = [(record.with_name(record.name[:-len(".json")] + f"_image{_NIFTI}"),
              Path(json.loads(record.read_text())["case"]["source_image"])) for record in records]
    inputs = {"bprime": _digest([image for image, _ in pairs])}
    if folder.exists() and _read_json(folder / INPUTS_FILE) != inputs:
        _discard(folder, f"its B' {variant!r} changed")  # a checkpoint of other data must not be resumed
    if (folder / MODEL_NAME).is_file():
        return Pix2Pix.load(folder / MODEL_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / INPUTS_FILE, json.dumps(inputs).encode())
    config = replace(pipeline.settings.pix2pix_config(pipeline.progress), seed=int(seed))
    return train_pix2pix(pairs, folder, config)


#: Beside seeded pix2pix models and predictions: the checksum of what they were made from.
INPUTS_FILE = "inputs.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _discard(folder: Path, why: str) -> None:
    import shutil
    import warnings

    warnings.warn(f"{folder} is stale ({why}); making it again.", stacklevel=3)
    shutil.rmtree(folder)


def segment_validation_seeded(pipeline: CrossModaPipeline, variant: str, seed: int) -> list[Path]:
    """Translate the validation scans with :func:`train_pix2pix_seeded`'s model, segment them
    with :math:`S_A`, and return the predictions on each scan's own grid (validation order)."""
    from singan_insert.io import atomic_write_bytes
    from singan_insert.stages.pix2pix import MODEL_NAME, Pix2Pix

    _check_variant(variant)
    method = f"{variant}_seed{int(seed)}"
    validation = pipeline.data.validation_images()
    outputs = [pipeline.prediction(method, name) for name, _ in validation]
    model_file = pix2pix_seeded_dir(pipeline, variant, seed) / MODEL_NAME
    if not model_file.is_file():
        raise SinganInsertError(f"{model_file} does not exist: train it with train_pix2pix_seeded first.")
    inputs = {"pix2pix": _digest([model_file])}
    folders = [pipeline.work / kind / method for kind in ("predictions", "translated", "predictions_grid")]
    if folders[0].exists() and _read_json(folders[0] / INPUTS_FILE) != inputs:
        for folder in folders:
            if folder.exists():
                _discard(folder, "its pix2pix model changed")
    if all(path.is_file() for path in outputs):
        return outputs
    folders[0].mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folders[0] / INPUTS_FILE, json.dumps(inputs).encode())
    model = Pix2Pix.load(model_file)
    translated = []
    for name, _ in validation:
        path = pipeline.translated(method, name)
        if not path.is_file():
            image = model.translate(pipeline.grid_validation(name))
            write_volume(path, np.asarray(image.dataobj, np.float32), image.affine)
        translated.append(path)
    grid_predictions = pipeline.segment(translated, pipeline.work / "predictions_grid" / method)
    for (name, native), grid_prediction, output in zip(validation, grid_predictions, outputs):
        label, grid_affine = read_volume(grid_prediction)
        _, native_affine = read_volume(native)
        write_volume(output, pipeline.to_native(label, grid_affine, native), native_affine)
    return outputs


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise SinganInsertError(f"variant must be one of {VARIANTS}, got {variant!r}.")
