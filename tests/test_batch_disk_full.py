"""`singan-insert insert` on a disk that fills up: one worker, several, or the batched path
(``--batch-cases``, what ``--device cuda`` runs), the batch stops alike.

The disk is simulated in the processes that write: the insertion is replaced by a module-level
function of this file (spawned workers import it by name), which fails every write after the
first output with ENOSPC, as the real writer reports it. The batched path writes in threads, so
there the disk tells the first output's files from the others' by name instead.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from singan_insert import batch
from singan_insert.batch import augment_case, write_case
from singan_insert.cli import main
from singan_insert.datasets.phantom import simulate_subject, write_crossmoda

SHAPE = (64, 64, 32)
CASES = 3
NUM = 3  # 9 outputs: more than two workers and their executor's queue take at once


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    for i in range(CASES):
        write_crossmoda(simulate_subject(30 + i, shape=SHAPE), folder, f"case_{i + 1}")
    return folder


def note_tried(out_dir, case, index) -> None:
    (Path(out_dir).parent / "tried").mkdir(exist_ok=True)
    (Path(out_dir).parent / "tried" / f"{case.name}_aug{index}").touch()


def full(path, payload):
    """``io._write_temporary`` on a full disk."""
    from singan_insert import io

    error = OSError(errno.ENOSPC, "No space left on device", str(path))
    raise io._write_error(Path(path), error) from error


def augment_on_a_filling_disk(case, index, model, settings, out_dir, *args, **kwargs):
    """``augment_case`` on a disk with room for case_1 aug 0 only; notes each output tried."""
    from singan_insert import io

    note_tried(out_dir, case, index)
    if (case.name, index) == ("case_1", 0):
        return augment_case(case, index, model, settings, out_dir, *args, **kwargs)
    real = io._write_temporary
    io._write_temporary = full
    try:
        return augment_case(case, index, model, settings, out_dir, *args, **kwargs)
    finally:
        io._write_temporary = real


def write_on_a_filling_disk(job, result, settings, out_dir):
    """``write_case`` of the batched path; notes each output tried (the disk: see the test)."""
    note_tried(out_dir, job.case, job.index)
    return write_case(job, result, settings, out_dir)


PATHS = {"1 worker": ["--workers", "1"], "2 workers": ["--workers", "2"], "batched": ["--batch-cases", "3"]}


@pytest.mark.parametrize("path", list(PATHS))
def test_a_full_disk_stops_the_batch_on_every_path(tiny_model_dir, data, tmp_path, capsys, monkeypatch, path):
    from singan_insert import io

    if path == "batched":
        real = io._write_temporary

        def room_for_case_1_aug0_only(target, payload):
            return (real if Path(target).name.startswith("case_1_aug0") else full)(target, payload)

        # Two threads write at once: swapping the writer per output (as above) would race.
        monkeypatch.setattr(io, "_write_temporary", room_for_case_1_aug0_only)
        monkeypatch.setattr(batch, "write_case", write_on_a_filling_disk)
    else:
        monkeypatch.setattr(batch, "augment_case", augment_on_a_filling_disk)
    out = tmp_path / "out"
    status = main(["insert", "--model", str(tiny_model_dir), "--data-root", str(data), "--target-suffix", "hrT2",
                   "--out", str(out), "--num", str(NUM), "--seed", "1", *PATHS[path]])
    printed = capsys.readouterr().out
    assert status == 1
    summary = next(line for line in printed.splitlines() if line.startswith("Wrote "))
    # The one-worker path's summary and order: the first output, then nothing but failures.
    assert summary.startswith(f"Wrote 1 augmentation(s) to {out}; {CASES * NUM - 1} failed, ")
    failed = [line for line in printed.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == CASES * NUM - 1
    assert failed[0] == "  failed: case_1 aug 1: the disk is full (no space left on device): this output was " \
                        "not written (no partial file is kept) and the batch stopped; free space and re-run " \
                        "to resume"
    assert failed[-1] == f"  failed: case_{CASES} aug {NUM - 1}: not run: the disk is full"
    not_run = [line for line in failed if line.endswith(": not run: the disk is full")]
    assert all(line in not_run or ": the disk is full (no space left" in line for line in failed)
    # Outputs already running when the disk filled end as they would alone; the queued ones are
    # not tried. With workers: the output each worker holds when the first failure comes back,
    # and the next one each may take in that moment (2 per worker, 1 spare), not all 9. Batched:
    # the first output and those its two I/O threads were writing when the first write failed.
    tried = sorted(p.name for p in (tmp_path / "tried").iterdir())
    assert len(tried) <= {"1 worker": 2, "2 workers": 2 * 2 + 1, "batched": 1 + 2}[path]
    assert len(tried) >= 2
    assert len(not_run) == CASES * NUM - len(tried)
    listed = [line.split(": ")[1] for line in failed]
    assert listed == sorted(listed, key=lambda name: (name.split(" aug ")[0], int(name.split(" aug ")[1])))
    # The finished output is kept whole; nothing of a failed one is (no temporary file either).
    assert {p.name for p in out.iterdir()} - {batch.LOCK_NAME} == {
        "case_1_aug0_image.nii.gz", "case_1_aug0_label.nii.gz", "case_1_aug0.json"}
