"""Several cases at once: one model on one device, the tumor slices of many cases per forward pass.

:func:`insert_tumors` gives, for a list of cases, what :func:`~singan_insert.insertion.insert.insert_tumor`
gives for each (same placement, mapping, blending, records, errors), but runs the harmonizer's
generators ONCE for every group of cases whose tumor slices have the same geometry (slice size,
pixel spacing, start scale and precision), with each case's own noise field, so a GPU sees large
batches instead of one small batch per case. The CPU-side work of the cases (placement, intensity
mapping, blending, restacking) runs in threads, one per case, which wait at the forward pass until
every case has reached it (or failed before).

Equality with the one-by-one path: each case keeps its own normalisation, seed, blend weight and
noise (drawn from its own generator in the same order), and a batched convolution computes each
sample independently, so the results agree with :func:`insert_tumor` up to floating-point
rounding of the batched kernels (exactly on most CPUs, ~1e-6 of the model range otherwise; with
bfloat16 precision, within its ~1e-3). Cases with different slice geometries are still run in
one call each per geometry, never padded (padding would change the resampling grids).

:func:`pipelined` is the I/O helper for whole datasets: background threads read the next cases
and write (and compress) finished ones while the caller's thread runs the model, so the device
is not idle during I/O.
"""

from __future__ import annotations

import copy
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.model import Harmonizer
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.insertion.insert import InsertionParameters, InsertionResult, insert_tumor
from singan_insert.insertion.placement import SourceTumor

__all__ = ["InsertionCase", "insert_tumors", "pipelined"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, eq=False)
class InsertionCase:
    """The arguments of one :func:`~singan_insert.insertion.insert.insert_tumor` call (same meaning)."""

    target_image: np.ndarray
    target_affine: np.ndarray
    source: SourceTumor
    parameters: InsertionParameters | None = None
    target_label: np.ndarray | None = None
    modality: str | None = None
    normalization: PercentileNormalization | None = None


def insert_tumors(
    cases: Sequence[InsertionCase],
    harmonizer: Harmonizer,
    *,
    return_exceptions: bool = False,
) -> list[InsertionResult | Exception]:
    """Insert one tumor into each case, batching the forward passes of all cases (see the module).

    Args:
        cases: the cases (any number; all are held in memory at once, so pass a chunk of a
            dataset: a few cases are enough to fill a GPU with tumor slices).
        harmonizer: the model, on the device it should run on.
        return_exceptions: put a failing case's :class:`~singan_insert.errors.SinganInsertError`
            in its place in the result list instead of raising it (the other cases still run).

    Returns:
        One :class:`~singan_insert.insertion.insert.InsertionResult` per case, in order.

    Give every case an explicit ``parameters.seed`` (the default, 0, is one): with
    ``seed=None`` the seeds are drawn from torch's global generator in whatever order the case
    threads get there, so they would not match a one-by-one run.
    """
    cases = list(cases)
    if any(not isinstance(c, InsertionCase) for c in cases):
        raise SinganInsertError("insert_tumors takes a sequence of InsertionCase.")
    if not cases:
        return []
    batcher = _ForwardBatcher(harmonizer, len(cases))

    def run(case: InsertionCase) -> InsertionResult:
        try:
            return insert_tumor(case.target_image, case.target_affine, case.source, batcher.proxy,
                                case.parameters, target_label=case.target_label,
                                modality=case.modality, normalization=case.normalization)
        finally:
            batcher.case_left()

    with ThreadPoolExecutor(max_workers=len(cases), thread_name_prefix="insert") as pool:
        futures = [pool.submit(run, case) for case in cases]
        batcher.serve()
    results: list[InsertionResult | Exception] = []
    for future in futures:
        error = future.exception()
        if error is None:
            results.append(future.result())
        elif return_exceptions and isinstance(error, SinganInsertError):
            results.append(error)
        else:
            raise error
    return results


class _ForwardBatcher:
    """Collects the cases' forward passes and runs them grouped by slice geometry.

    Each case thread calls :meth:`Harmonizer._generate` on :attr:`proxy` at most once (one
    harmonize call per insertion) and blocks there; :meth:`serve`, on the caller's thread, runs
    the pending requests whenever every case still running has one pending.
    """

    def __init__(self, harmonizer: Harmonizer, num_cases: int):
        self.harmonizer = harmonizer
        self.running = num_cases  # case threads that have not finished
        self.pending: list[tuple[tuple, torch.Tensor, torch.Generator, Future, torch.Tensor | None,
                                 tuple[int, int, int, int] | None]] = []
        self.condition = threading.Condition()
        self.proxy = copy.copy(harmonizer)  # shares the networks; only _generate differs
        self.proxy._generate = self._submit

    def _submit(self, composite, scale, spacing, generator, shared_noise, autocast_dtype=None, mask=None,
                noise=None, needed=None):
        if noise is not None or not shared_noise:
            raise SinganInsertError("Batched insertion needs shared noise per case (insert_tumor's).")
        key = (tuple(composite.shape[1:]), int(scale), None if spacing is None else tuple(spacing),
               autocast_dtype)
        future: Future = Future()
        with self.condition:
            self.pending.append((key, composite, generator, future, mask, needed))
            self.condition.notify_all()
        return future.result()

    def case_left(self) -> None:
        with self.condition:
            self.running -= 1
            self.condition.notify_all()

    def serve(self) -> None:
        while True:
            with self.condition:
                # Every case thread still alive is waiting at its forward pass (or none is left).
                self.condition.wait_for(lambda: len(self.pending) == self.running)
                if self.running == 0:
                    return
                requests, self.pending = self.pending, []
            groups: dict[tuple, list] = defaultdict(list)
            for request in requests:
                groups[request[0]].append(request)
            for (_, scale, spacing, autocast_dtype), group in groups.items():
                self._run_group(group, scale, spacing, autocast_dtype)

    def _run_group(self, group, scale, spacing, autocast_dtype) -> None:
        counts = [request[1].shape[0] for request in group]
        generators = [request[2] for request in group]
        device = self.harmonizer.device

        def noise(shape: tuple[int, ...]) -> torch.Tensor:
            # Each case's own shared field, drawn from its own generator, as in one-by-one calls.
            fields = [torch.randn((1, *shape[1:]), generator=g).to(device).expand(n, *shape[1:])
                      for g, n in zip(generators, counts)]
            return torch.cat(fields)

        try:
            composite = torch.cat([request[1] for request in group])
            masks = [request[4] for request in group]
            # The mask is an input only of mask-channel architectures; it is given for every case or none.
            mask = None if any(m is None for m in masks) else torch.cat(masks)
            boxes = [request[5] for request in group]
            # The union of the cases' boxes: the generators run once on the whole batch.
            needed = None if any(b is None for b in boxes) else (
                min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))
            generated = self.harmonizer._generate(composite, scale, spacing, None, True,
                                                  autocast_dtype, mask=mask, noise=noise, needed=needed)
        except BaseException as error:  # every waiting case must wake up, with the error
            for request in group:
                request[3].set_exception(error)
            return
        for request, part in zip(group, torch.split(generated, counts)):
            request[3].set_result(part)


def pipelined(
    items: Iterable[T],
    read: Callable[[T], Any],
    process: Callable[[list[Any]], list[R]],
    write: Callable[[T, R], Any] | None = None,
    *,
    chunk_size: int = 8,
    io_threads: int = 2,
) -> list[Any]:
    """Read items in background threads, ``process`` them in chunks here, write in background.

    While chunk ``k`` is processed on the caller's thread (the one that owns the device), the
    items of chunk ``k + 1`` are being read and those of chunk ``k - 1`` written: reading,
    decompression, compression and writing overlap the model's work. At most two chunks are
    read ahead, so memory stays bounded.

    Args:
        items: what to work on (e.g. case descriptions); iterated once.
        read: ``item -> value`` (e.g. load the volumes), run in the I/O threads.
        process: ``[values of a chunk] -> [results]`` (e.g. :func:`insert_tumors`), run here.
        write: ``(item, result) -> output`` (e.g. write NIfTI files), run in the I/O threads;
            ``None`` returns the results themselves.
        chunk_size: items per ``process`` call (>= 1).
        io_threads: background threads for reading and writing (>= 1).

    Returns:
        The outputs of ``write`` (or the results), in the order of ``items``. An exception in
        any step is raised here, after the work already started has finished.
    """
    if chunk_size < 1 or io_threads < 1:
        raise SinganInsertError("chunk_size and io_threads must be >= 1.")
    outputs: list[Future] = []
    with ThreadPoolExecutor(io_threads, thread_name_prefix="io") as io:
        chunks = _chunks(iter(items), chunk_size)
        ahead: list[tuple[list[T], list[Future]]] = []

        def read_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                ahead.append((chunk, [io.submit(read, item) for item in chunk]))

        read_next()
        read_next()
        while ahead:
            chunk, reads = ahead.pop(0)
            read_next()
            results = process([future.result() for future in reads])
            if len(results) != len(chunk):
                raise SinganInsertError(f"process returned {len(results)} results for {len(chunk)} items.")
            for item, result in zip(chunk, results):
                outputs.append(io.submit(write, item, result) if write is not None else _done(result))
        return [future.result() for future in outputs]


def _chunks(iterator: Iterator[T], size: int) -> Iterator[list[T]]:
    while True:
        chunk = [item for _, item in zip(range(size), iterator)]
        if not chunk:
            return
        yield chunk


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
