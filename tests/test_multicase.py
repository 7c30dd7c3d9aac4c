"""Several cases per forward pass (singan_insert.insertion.multicase) on CPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import ndimage

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.networks import GeneratorPyramid
from singan_insert.insertion.insert import InsertionParameters, insert_tumor
from singan_insert.insertion.multicase import InsertionCase, insert_tumors, pipelined
from singan_insert.insertion.placement import Placement, SourceTumor

AFFINE = np.diag([0.5, 0.5, 1.5, 1.0])


def volume(seed, shape=(48, 48, 16)):
    rng = np.random.default_rng(seed)
    return (100 + ndimage.gaussian_filter(rng.normal(size=shape), (2, 2, 0.7)) * 60).astype(np.float32)


@pytest.fixture(scope="module")
def source():
    shape = (48, 48, 16)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, (24, 24, 8), (7, 5, 3))) <= 1
    image = np.where(mask, 55.0, volume(1))
    return SourceTumor.from_arrays(image, mask.astype(np.uint8), AFFINE)


def cases(source):
    def parameters(location, seed, **fixed):
        return InsertionParameters(placement=Placement(location=location), seed=seed, **fixed)

    return [
        # Cases 0 and 1: the same slice geometry (one forward pass), other data, seeds and
        # appearance (the model's choice; the paper's fixed lambda).
        InsertionCase(volume(2), AFFINE, source, parameters((22, 25, 8), 1)),
        InsertionCase(volume(3), AFFINE, source, parameters((26, 22, 7), 2, appearance="fixed", contrast=0.8)),
        # Case 2: a larger volume and a rotated tumor: another geometry.
        InsertionCase(volume(4, (56, 52, 16)), AFFINE, source, InsertionParameters(
            placement=Placement(location=(30, 26, 8), rotation_degrees=(0, 0, 30)), seed=3),
            target_label=np.full((56, 52, 16), 2, np.uint8)),
    ]


def test_same_results_as_one_by_one_with_one_forward_pass_per_geometry(source, tiny_harmonizer, monkeypatch):
    expected = [insert_tumor(c.target_image, c.target_affine, c.source, tiny_harmonizer, c.parameters,
                             target_label=c.target_label) for c in cases(source)]
    calls = []
    original = GeneratorPyramid.run
    monkeypatch.setattr(GeneratorPyramid, "run", lambda self, x, *a, **k: (calls.append(x.shape[0]),
                                                                          original(self, x, *a, **k))[1])
    results = insert_tumors(cases(source), tiny_harmonizer)
    slices = [len(e.record["tumor"]["slices"]) for e in expected]
    assert sorted(calls) == sorted([slices[0] + slices[1], slices[2]])  # cases 0 and 1 batched
    scale = np.ptp(cases(source)[0].target_image)
    for result, reference in zip(results, expected):
        np.testing.assert_allclose(result.image, reference.image, rtol=0, atol=1e-4 * scale)
        np.testing.assert_array_equal(result.label, reference.label)
        assert result.record == reference.record


def test_batched_cases_stored_otherwise_are_inserted_in_the_model_s_orientation(source, tiny_harmonizer):
    model = tiny_harmonizer.copy()
    model.metadata = {**model.metadata, "provenance": {**model.provenance, "orientation": "RAS"}}
    mirrored = AFFINE.copy()
    mirrored[:3, 3] += mirrored[:3, 0] * 47
    mirrored[:, 0] *= -1
    plain = cases(source)[:2]
    flipped = [InsertionCase(np.ascontiguousarray(c.target_image[::-1]), mirrored, c.source,
                             InsertionParameters(placement=Placement(location=(47 - c.parameters.placement.location[0],
                                                                               *c.parameters.placement.location[1:])),
                                                 appearance=c.parameters.appearance, contrast=c.parameters.contrast,
                                                 seed=c.parameters.seed))
               for c in plain]
    expected = insert_tumors(plain, model)
    results = insert_tumors(flipped, model)
    for result, reference in zip(results, expected):
        np.testing.assert_allclose(result.image[::-1], reference.image, rtol=0, atol=1e-4 * np.ptp(plain[0].target_image))
        assert result.record["orientation"]["target"] == "LAS"


def test_a_failing_case_does_not_stop_the_others(source, tiny_harmonizer):
    bad = InsertionCase(volume(5), AFFINE, source, InsertionParameters(
        placement=Placement(location=(1, 1, 1))))  # the tumor sticks out of the volume
    good = cases(source)[0]
    results = insert_tumors([good, bad], tiny_harmonizer, return_exceptions=True)
    assert isinstance(results[1], SinganInsertError)
    reference = insert_tumor(good.target_image, good.target_affine, good.source, tiny_harmonizer,
                             good.parameters)
    np.testing.assert_allclose(results[0].image, reference.image, atol=1e-4 * np.ptp(good.target_image))
    with pytest.raises(SinganInsertError):
        insert_tumors([good, bad], tiny_harmonizer)
    assert insert_tumors([], tiny_harmonizer) == []


def test_pipelined_keeps_order_and_reads_ahead_while_processing():
    next_chunk_read = threading.Event()

    def read(item):
        if item == 3:
            next_chunk_read.set()
        return item * 10

    def process(values):
        if values[0] == 0:
            # Without read-ahead the next chunk's reads would only start after this returns.
            assert next_chunk_read.wait(timeout=10)
        return [v + 1 for v in values]

    outputs = pipelined(range(7), read, process, lambda item, result: (item, result),
                        chunk_size=3, io_threads=2)
    assert outputs == [(i, i * 10 + 1) for i in range(7)]
    assert pipelined(range(4), read, process, chunk_size=3) == [1, 11, 21, 31]
    assert pipelined([], read, process) == []
    with pytest.raises(SinganInsertError, match="chunk_size"):
        pipelined(range(3), read, process, chunk_size=0)
