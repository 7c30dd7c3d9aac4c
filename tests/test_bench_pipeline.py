"""The extra B' variants and seeded pix2pix runs of bench_pipeline (singan_insert.pipeline.variants)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from singan_insert.errors import SinganInsertError
from singan_insert.evaluation.baselines import slice_blend_weight
from singan_insert.insertion.placement import spacing_from_affine
from singan_insert.pipeline import variants
from singan_insert.pipeline.workflow import (
    CrossModaPipeline,
    PipelineSettings,
    read_volume,
    resample_image,
    simulate_crossmoda,
)


@pytest.fixture(scope="module")
def inserted(tmp_path_factory):
    """A tiny pipeline up to the insertion step (about 10-20 s on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("variants")
    data = simulate_crossmoda(root / "data", 2, 1, 1, seed=0)
    pipeline = CrossModaPipeline(data, root / "run", PipelineSettings.profile("tiny"))
    pipeline.train_cyclegan()
    pipeline.translate_sources()
    pipeline.train_harmonizer()
    pipeline.insert_tumors()
    yield pipeline
    torch.set_num_threads(threads)


def _twins(pipeline):
    return sorted(pipeline.bprime_dir("harmonized").glob("*_aug*.json"))


def _pairs(pipeline, variant):
    for record in _twins(pipeline):
        stem = record.name[:-len(".json")]
        info = json.loads(record.read_text())
        fake, affine = read_volume(info["case"]["target"])
        label = read_volume(record.with_name(f"{stem}_label.nii.gz"))[0]
        image = read_volume(pipeline.bprime_dir(variant) / f"{stem}_image.nii.gz")[0]
        own_record = json.loads((pipeline.bprime_dir(variant) / f"{stem}.json").read_text())
        yield info, fake, affine, label == 1, image, own_record


def test_oracle_blends_the_true_hrt2_with_our_weight(inserted):
    written = variants.write_oracle_bprime(inserted)
    assert len(written) == len(_twins(inserted)) >= 1 and all(path.is_file() for path in written)
    for info, fake, affine, mask, image, record in _pairs(inserted, "oracle"):
        subject = variants.simulated_subject(inserted.data, info["case"]["name"])
        truth = resample_image(subject.image_b, subject.affine_b, affine, fake.shape)
        low, high = np.percentile(truth, (0.5, 99.5))
        fake_low, fake_high = np.percentile(fake, (0.5, 99.5))
        truth = fake_low + (truth - low) * (fake_high - fake_low) / (high - low)  # in the fake's units
        weight = slice_blend_weight(mask, axis=2, spacing=spacing_from_affine(affine))
        np.testing.assert_allclose(image[weight == 1], truth[weight == 1], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(image[weight == 0], fake[weight == 0])
        assert record["variant"] == "oracle" and record["case"] == info["case"]
    assert variants.write_oracle_bprime(inserted) == written  # resumes: nothing rewritten


def test_gba_scales_the_translated_tumor_in_place(inserted):
    written = variants.write_gba_bprime(inserted)
    assert len(written) == len(_twins(inserted)) >= 1
    for info, fake, affine, mask, image, record in _pairs(inserted, "gba"):
        contrast = record["parameters"]["contrast"]
        assert contrast in variants.GBA_CONTRASTS and record["case"] == info["case"]
        weight = slice_blend_weight(mask, axis=2, spacing=spacing_from_affine(affine),
                                    dilation_mm=record["parameters"]["dilation_mm"],
                                    feather_mm=record["parameters"]["feather_mm"])
        np.testing.assert_array_equal(image[weight == 0], fake[weight == 0])
        assert not np.allclose(image[mask], fake[mask])
    with pytest.raises(SinganInsertError, match="GBA contrast factor must be > 0"):
        variants.write_gba_bprime(inserted, contrasts=(0.0,))


def test_seeded_pix2pix_and_validation_predictions(inserted):
    variants.write_oracle_bprime(inserted)
    first = variants.train_pix2pix_seeded(inserted, "oracle", 0)
    second = variants.train_pix2pix_seeded(inserted, "oracle", 1)
    weights = [next(iter(m.generator.parameters())).detach() for m in (first, second)]
    assert not torch.equal(*weights)  # the seed reaches the training
    inserted.train_source_segmenter()
    predictions = variants.segment_validation_seeded(inserted, "oracle", 1)
    (name, native), = inserted.data.validation_images()
    assert predictions == [inserted.prediction("oracle_seed1", name)]
    assert read_volume(predictions[0])[0].shape == read_volume(native)[0].shape
    with pytest.raises(SinganInsertError, match="variant"):
        variants.train_pix2pix_seeded(inserted, "cyclegan", 0)


def test_oracle_needs_simulated_data(tmp_path):
    from singan_insert.pipeline.workflow import CrossModaData

    with pytest.raises(SinganInsertError, match="simulation.json"):
        variants.simulated_subject(CrossModaData(tmp_path), "crossmoda2021_ldn_1")


def test_training_label_annotates_the_harmonizer_and_unannotated_replays_without(inserted):
    model = inserted.train_harmonizer()
    assert model.tumor_annotation is not None  # simulate_crossmoda ships a training label
    assert {json.loads(r.read_text())["appearance"]["by"] for r in _twins(inserted)} == {"annotation"}
    written = variants.write_unannotated_bprime(inserted)
    assert len(written) == len(_twins(inserted)) >= 1
    for path in written:
        record = json.loads(path.with_name(path.name.replace("_image.nii.gz", ".json")).read_text())
        assert record["variant"] == "unannotated" and record["appearance"]["by"] == "realism"
        # the unannotated model's own defaults, not the annotated twin's resolved choices
        assert record["parameters"]["rim"] is False and record["parameters"]["harmonize_tumor"] is True
        image, label = read_volume(path)[0], read_volume(path.with_name(path.name.replace("_image", "_label")))[0]
        twin = read_volume(inserted.bprime_dir("harmonized") / path.name)[0]
        assert not np.allclose(image[label == 1], twin[label == 1])  # the annotation changed the tumor
    # The cached model follows the settings: annotate=False removes the annotation (no retraining).
    plain = CrossModaPipeline(inserted.data, inserted.work, None)
    plain.settings = PipelineSettings.profile("tiny", annotate=False)
    assert plain.train_harmonizer().tumor_annotation is None
    assert inserted.train_harmonizer().tumor_annotation is not None  # and back
    with pytest.raises(SinganInsertError, match="annotate"):
        PipelineSettings.profile("tiny", annotate="yes")


def test_replayed_is_ours_and_its_naive_paste_again_under_unchanged_code(inserted):
    # What dev_pipeline_variant's 'replayed' rows rest on: the same code makes the same B'.
    written = variants.write_replayed_bprime(inserted)
    assert len(written) == len(_twins(inserted)) >= 1
    for twin in _twins(inserted):
        stem = twin.name[:-len(".json")]
        for variant, original in (("replayed", "harmonized"), ("replayed_naive", "naive")):
            again = read_volume(inserted.bprime_dir(variant) / f"{stem}_image.nii.gz")[0]
            np.testing.assert_array_equal(again, read_volume(inserted.bprime_dir(original) / f"{stem}_image.nii.gz")[0])
        record = json.loads((inserted.bprime_dir("replayed_naive") / twin.name).read_text())
        assert record["variant"] == "replayed_naive" and record["naive_paste"] is True


def test_narrow_blend_replays_ours_with_a_narrower_blend(inserted):
    written = variants.write_narrow_blend_bprime(inserted)
    assert len(written) == len(_twins(inserted)) >= 1
    for info, fake, affine, mask, image, record in _pairs(inserted, "narrow_blend"):
        assert record["parameters"]["dilation_mm"] == 0 and record["parameters"]["feather_mm"] == 1
        # Beyond the narrow blend's reach and the rim (3 mm x its scale), the fake hrT2 is untouched.
        weight = slice_blend_weight(mask, axis=2, spacing=spacing_from_affine(affine), dilation_mm=0.0,
                                    feather_mm=1.0)
        far = (weight == 0) & _beyond(mask, affine, 3.0 * record["parameters"]["rim_scale"])
        np.testing.assert_array_equal(image[far], fake[far])


def _beyond(mask, affine, mm):
    """Voxels farther than ``mm`` (in-plane, per slice along the last axis) from the mask."""
    from singan_insert.insertion.appearance import inplane_distance

    spacing = spacing_from_affine(affine)
    distance = np.moveaxis(inplane_distance(np.moveaxis(mask, 2, 0), spacing[:2]), 0, 2)
    return distance > mm


def test_ablation_variants_replay_ours_without_one_part(inserted):
    for write in (variants.write_no_rim_bprime, variants.write_fixed_rim_bprime, variants.write_no_pyramid_bprime,
                  variants.write_tumor_harmonized_bprime):
        assert len(write(inserted)) == len(_twins(inserted)) >= 1
    for name in ("no_rim", "fixed_rim", "no_pyramid", "tumor_harmonized"):
        for twin_path in _twins(inserted):
            stem = twin_path.name[:-len(".json")]
            twin = json.loads(twin_path.read_text())
            record = json.loads((inserted.bprime_dir(name) / twin_path.name).read_text())
            image = read_volume(inserted.bprime_dir(name) / f"{stem}_image.nii.gz")[0]
            ours = read_volume(inserted.bprime_dir("harmonized") / f"{stem}_image.nii.gz")[0]
            mask = read_volume(twin_path.with_name(f"{stem}_label.nii.gz"))[0] == 1
            assert twin["parameters"]["rim"] is True and twin["parameters"]["harmonize_tumor"] is False
            assert record["variant"] == name and not np.array_equal(image, ours)
            if name == "no_rim":
                assert record["parameters"]["rim"] is False
            if name == "fixed_rim":  # ours' rim follows the tumor's size; this one keeps the annotated mm
                assert record["parameters"]["rim_scale"] == 1.0 != twin["parameters"]["rim_scale"]
                np.testing.assert_array_equal(image[mask], ours[mask])
            if name == "tumor_harmonized":
                assert record["parameters"]["harmonize_tumor"] is True
                assert not np.allclose(image[mask], ours[mask])
            if name == "no_pyramid":
                # The default keeps the tumor's chosen appearance: the generators act on its
                # surroundings only, so without them the tumor itself is the same, bit for bit.
                np.testing.assert_array_equal(image[mask], ours[mask])


def test_stale_variants_models_and_predictions_are_made_again(inserted):
    variants.write_oracle_bprime(inserted)
    twin = _twins(inserted)[0]
    oracle_record = inserted.bprime_dir("oracle") / twin.name
    before = oracle_record.stat().st_mtime_ns
    assert variants.write_oracle_bprime(inserted) and oracle_record.stat().st_mtime_ns == before  # current: kept
    original = twin.read_text()
    try:
        twin.write_text(original.replace('"format"', '"format" ', 1))  # the twin changed
        variants.write_oracle_bprime(inserted)
        assert json.loads(oracle_record.read_text())["twin_checksum"] == variants._digest([twin])
    finally:
        twin.write_text(original)
    variants.write_oracle_bprime(inserted)
    model = variants.train_pix2pix_seeded(inserted, "oracle", 0)
    folder = variants.pix2pix_seeded_dir(inserted, "oracle", 0)
    (folder / variants.INPUTS_FILE).write_text('{"bprime": "something else"}')
    with pytest.warns(UserWarning, match="stale"):
        again = variants.train_pix2pix_seeded(inserted, "oracle", 0)
    assert torch.equal(next(iter(model.generator.parameters())), next(iter(again.generator.parameters())))
    inserted.train_source_segmenter()
    variants.segment_validation_seeded(inserted, "oracle", 0)
    predictions = inserted.work / "predictions" / "oracle_seed0"
    (predictions / variants.INPUTS_FILE).write_text("{}")
    with pytest.warns(UserWarning, match="pix2pix model changed"):
        assert all(p.is_file() for p in variants.segment_validation_seeded(inserted, "oracle", 0))
