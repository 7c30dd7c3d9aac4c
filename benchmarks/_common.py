"""Helpers shared by the benchmark scripts: machine description, tables, JSON output."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) restricted to ``columns``."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str, folder: Path | None = None) -> Path:
    """Write ``<folder>/<name>.json`` (with the machine description) and ``<name>.md``.

    NaN and infinities become ``null`` so that the JSON is valid for any reader.
    """
    folder = RESULTS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(_finite({"machine": machine(), **payload}), indent=2, default=str, allow_nan=False))
    (folder / f"{name}.md").write_text(markdown + "\n")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def add_subject_arguments(parser, first_seed: int = 200, subjects: int = 8) -> None:
    """``--subjects``, ``--first-seed`` and ``--model-dir`` of the development scripts."""
    parser.add_argument("--subjects", type=int, default=subjects)
    parser.add_argument("--first-seed", type=int, default=first_seed,
                        help="seeds first..first+subjects-1 (100-111 were used to develop the method)")
    parser.add_argument("--model-dir", default=str(RESULTS / "dev_model"))


def development_model(model_dir: str | Path, reuse: bool = True, preset: str = "fast", **config: Any):
    """The development harmonizer: ``preset`` (with ``config`` overrides) trained with seed 0 on ONE
    hrT2 slice of simulated subject 0, in ``model_dir``; with ``reuse``, the one already there.

    Returns ``(model, training subject, slice index)``.
    """
    from singan_insert.datasets.phantom import simulate_subject
    from singan_insert.evaluation.experiments import training_slice_from_subject
    from singan_insert.harmonizer.model import Harmonizer
    from singan_insert.harmonizer.training import TrainingConfig, train_harmonizer

    subject = simulate_subject(0)
    image, spacing2d, index = training_slice_from_subject(subject)
    model_file = Path(model_dir) / "harmonizer.safetensors"
    if reuse and model_file.exists():
        return Harmonizer.load(model_file), subject, index
    model = train_harmonizer(image, TrainingConfig.preset(preset, **config), out_dir=model_dir, seed=0,
                             spacing=spacing2d, device="cpu", progress=False,
                             provenance={"axis": 2, "slice_index": index, "modality": "hrT2"})
    return model, subject, index


def development_case(seed: int):
    """Simulated subject ``seed`` as the development scripts use it: ``(subject, washed-out hrT2
    target, its modality-A tumor as a SourceTumor, hrT2 spacing, slice axis)``."""
    from singan_insert.datasets.phantom import simulate_subject
    from singan_insert.insertion.insert import through_plane_axis
    from singan_insert.insertion.placement import SourceTumor

    subject = simulate_subject(seed)
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    spacing = tuple(float(s) for s in subject.spacing_b)
    return subject, subject.render_b_washed_out(), source, spacing, through_plane_axis(spacing)
