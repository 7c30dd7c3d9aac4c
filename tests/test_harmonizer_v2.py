"""Harmonizer v2: automatic appearance, texture, training health, presets, old model files."""

from __future__ import annotations

import json
import warnings
import numpy as np
import pytest
import torch
from scipy import ndimage

from singan_insert import Harmonizer, TrainingConfig, train_harmonizer
from singan_insert.datasets.phantom import simulate_subject
from singan_insert.errors import SinganInsertError
from singan_insert.evaluation.experiments import training_slice_from_subject
from singan_insert.harmonizer import training as training_module
from singan_insert.harmonizer.training import TrainingHealthWarning, scale_health
from singan_insert.insertion.appearance import (PatchBank, choose_level, highpass, inject_texture, partial_volume,
                                                ring, robust_std, spread_outward)
from singan_insert.insertion.insert import InsertionParameters, insert_tumor
from singan_insert.insertion.intensity import map_tumor_intensities, robust_range, soft_knee
from singan_insert.insertion.placement import SourceTumor


@pytest.fixture(scope="module")
def simulated_model(tmp_path_factory):
    """A seconds-long training on the simulator's hrT2 slice at its own size (128 px)."""
    image, spacing, index = training_slice_from_subject(simulate_subject(0))
    config = TrainingConfig.preset("tiny", max_size=128, min_size=24, iterations=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)  # 20 iterations: not the point here
        return train_harmonizer(image, config, seed=0, spacing=spacing, progress=False,
                                provenance={"axis": 2, "modality": "hrT2"})


def tumor_contrast(image, mask, spacing):
    """Mean inside the mask minus mean of the 2 mm shell around it."""
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    shell = (distance > 0) & (distance <= 2.0)
    return float(image[mask].mean() - image[shell].mean())


@pytest.mark.parametrize("seed", [1, 2])
def test_default_insertion_keeps_the_tumor_visible_where_the_raw_paste_vanishes(simulated_model, seed):
    subject = simulate_subject(seed)
    washed = subject.render_b_washed_out()
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    default = insert_tumor(washed, subject.affine_b, source, simulated_model, InsertionParameters(seed=0))
    truth = subject.render_b(default.mask)
    spacing = subject.spacing_b
    true_contrast = tumor_contrast(truth, default.mask, spacing)
    assert true_contrast < 0  # hrT2: the schwannoma is darker than the CSF around it
    ours = tumor_contrast(default.image, default.mask, spacing)
    assert np.sign(ours) == np.sign(true_contrast) and abs(ours) >= 0.6 * abs(true_contrast)
    # The paper's mode at lambda = 1 (the same raw paste) gives the tumor the wrong sign or
    # makes it vanish: the check above can fail.
    paper = insert_tumor(washed, subject.affine_b, source, simulated_model,
                         InsertionParameters(seed=0, appearance="fixed", contrast=1.0))
    paper_contrast = tumor_contrast(paper.image, paper.mask, spacing)
    assert not (np.sign(paper_contrast) == np.sign(true_contrast)
                and abs(paper_contrast) >= 0.6 * abs(true_contrast))
    record = default.record["appearance"]
    assert record["mode"] == "auto" and 0 < record["lambda"] < 1
    # The input lambda does not matter with the automatic appearance.
    again = insert_tumor(washed, subject.affine_b, source, simulated_model,
                         InsertionParameters(seed=0, contrast=0.5))
    assert np.array_equal(again.image, default.image)


def test_visibility_floor_excludes_the_surroundings_level():
    """A bank that only knows the background level would choose "vanished" without the floor."""
    flat = torch.zeros(64, 64)
    bank = PatchBank(flat)
    background = torch.zeros(1, 40, 40)
    mask = torch.zeros(1, 40, 40)
    mask[0, 15:25, 15:25] = 1
    region = torch.ones(1, 40, 40)
    free = choose_level(bank, background, mask, region, shell=0.0, visibility_floor=0.0)
    assert abs(free.level) < 0.1
    floored = choose_level(bank, background, mask, region, shell=0.0, visibility_floor=0.2)
    assert abs(floored.level) >= 0.4 - 1e-6
    with pytest.raises(SinganInsertError, match="visibility_floor"):
        choose_level(bank, background, mask, region, shell=0.0, visibility_floor=0.7)


class _CurveBank:
    """A stand-in for PatchBank whose score is a given function of the candidate level."""

    def __init__(self, curve):
        self.curve = curve

    def score(self, images, region):
        levels = images[:, 0, 20, 20]  # the candidates' tumor level (a pixel inside the mask)
        return torch.tensor([self.curve(float(v)) for v in levels])

    def score_and_visibility(self, images, region, reference):  # equal visibility: the side is the score's
        return self.score(images, region), torch.ones(images.shape[0])


@pytest.mark.parametrize("curve, ambiguous", [
    (lambda v: 3.0 + (v + 0.3) ** 2, False),                               # one minimum, darker
    (lambda v: 3.84 + min((v + 0.25) ** 2, (v - 0.55) ** 2 - 0.01), True),  # a near-tie, brighter wins
    (lambda v: 3.84 + min((v + 0.25) ** 2, (v - 0.55) ** 2 + 0.3), False),  # a clear darker minimum
])
def test_level_choice_flags_a_near_tie_between_darker_and_brighter(curve, ambiguous):
    background = torch.zeros(1, 40, 40)
    mask = torch.zeros(1, 40, 40)
    mask[0, 15:25, 15:25] = 1
    choice = choose_level(_CurveBank(curve), background, mask, torch.ones(1, 40, 40), shell=0.1)
    assert choice.ambiguous is ambiguous and choice.to_dict()["ambiguous"] is ambiguous
    assert choice.other_side_margin is not None and (choice.other_side_margin < 0.02) is ambiguous


class _HidingBank(_CurveBank):
    """A realism score lowest where the tumor nearly hides (just past the floor, dark side), and
    visibility that grows with the distance from the surroundings, as real patches' does."""

    def score_and_visibility(self, images, region, reference):
        return self.score(images, region), (images[:, 0, 20, 20] - reference[0, 20, 20]).abs()


def test_the_side_is_chosen_by_realism_per_visibility_and_the_level_by_realism():
    background = torch.full((1, 40, 40), -0.6)
    mask = torch.zeros(1, 40, 40)
    mask[0, 15:25, 15:25] = 1
    # Realism alone: best at -0.75 (hiding in dark surroundings), 2.0; on the bright side at +0.75, 3.0.
    curve = lambda v: 2.0 + 4 * (v + 0.75) ** 2 if v < -0.6 else 3.0 + 4 * (v - 0.75) ** 2  # noqa: E731
    choice = choose_level(_HidingBank(curve), background, mask, torch.ones(1, 40, 40), shell=-0.6,
                          visibility_floor=0.05)
    assert choice.level > -0.6  # per unit of visibility the bright side wins: 3.0 / 1.35 < 2.0 / 0.15
    assert choice.level == pytest.approx(0.75, abs=0.05)  # ...and realism alone sets the level there
    assert choice.to_dict()["per_visibility"] == [round(v, 4) for v in choice.per_visibility]
    # Realism alone prefers the other side (2.0 against 3.0): the choice is not confirmed.
    assert choice.other_side_margin == pytest.approx((2.0 - 3.0) / 3.0, abs=0.02) and choice.ambiguous


def test_a_near_tie_of_realism_is_ambiguous_whatever_the_room_on_each_side():
    """With visibility growing with the distance from the surroundings, as real patches', S / V
    favours the side with more room; a near-tie of realism alone must still be flagged."""
    background = torch.full((1, 40, 40), 0.1)
    mask = torch.zeros(1, 40, 40)
    mask[0, 15:25, 15:25] = 1
    near_tie = lambda v: 3.84 + min((v + 0.25) ** 2, (v - 0.55) ** 2 - 0.01)  # noqa: E731
    choice = choose_level(_HidingBank(near_tie), background, mask, torch.ones(1, 40, 40), shell=0.1)
    assert abs(choice.other_side_margin) < 0.02 and choice.ambiguous


def test_an_ambiguous_level_choice_warns_and_is_recorded(simulated_model, monkeypatch):
    from singan_insert.insertion import insert as insert_module
    from singan_insert.insertion.appearance import AmbiguousLevelWarning, LevelChoice

    def near_tie(bank, background, mask, region, shell, *args):
        return LevelChoice(shell + 0.5, shell, [shell - 0.5, shell + 0.5], [3.85, 3.84], [True, True], 0.003)

    subject = simulate_subject(1)
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    washed = subject.render_b_washed_out()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousLevelWarning)  # the real choice here is clear
        insert_tumor(washed, subject.affine_b, source, simulated_model, InsertionParameters(seed=0))
    monkeypatch.setattr(insert_module, "choose_level", near_tie)
    with pytest.warns(AmbiguousLevelWarning, match="brighter.*Annotate the tumor"):
        result = insert_tumor(washed, subject.affine_b, source, simulated_model, InsertionParameters(seed=0))
    assert result.record["appearance"]["choice"]["ambiguous"] is True


def test_an_unannotated_model_warns_once_that_its_level_is_realisms_guess(simulated_model):
    from singan_insert.insertion import UnannotatedModelWarning

    subject = simulate_subject(1)
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    washed = subject.render_b_washed_out()
    model = simulated_model.copy()  # a model object of its own: the warning is once per model
    with pytest.warns(UnannotatedModelWarning, match="hrT2 is chosen by realism.*Annotate the tumor"):
        first = insert_tumor(washed, subject.affine_b, source, model, InsertionParameters(seed=0))
    assert first.record["appearance"]["by"] == "realism"
    _, _, index = training_slice_from_subject(simulate_subject(0))
    annotated = simulated_model.copy().annotate(np.take(simulate_subject(0).label_b, index, axis=2) == 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnannotatedModelWarning)
        insert_tumor(washed, subject.affine_b, source, model, InsertionParameters(seed=1))  # said once
        insert_tumor(washed, subject.affine_b, source, annotated, InsertionParameters(seed=0))
        insert_tumor(washed, subject.affine_b, source, simulated_model.copy(),  # no level chosen here
                     InsertionParameters(seed=0, appearance="fixed", contrast=0.5))
    # Turned into an error, it stops every insertion, not only the first.
    strict = simulated_model.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnannotatedModelWarning)
        for _ in range(2):
            with pytest.raises(UnannotatedModelWarning):
                insert_tumor(washed, subject.affine_b, source, strict, InsertionParameters(seed=0))


def test_the_default_makes_an_enhancing_tumor_brighter_than_its_surroundings_in_cet1():
    """The other way round: hrT2 tumors into ceT1, with a model of one ceT1 slice. Realism alone
    made them darker than their CSF (subjects 2 and 3 here: contrast -40 and -77)."""
    from singan_insert.insertion import UnannotatedModelWarning

    train = simulate_subject(0)
    k = int((train.label_a == 1).sum(axis=(0, 1)).argmax())
    config = TrainingConfig.preset("tiny", max_size=128, min_size=24, iterations=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        model = train_harmonizer(np.take(train.image_a, k, axis=2), config, seed=0, spacing=train.spacing_a[:2],
                                 progress=False, sample_figures=False, provenance={"axis": 2, "modality": "ceT1"})
    for seed in (2, 3):
        subject = simulate_subject(seed)
        washed = subject.render_a(np.zeros(subject.label_a.shape, bool))
        source = SourceTumor.from_arrays(subject.image_b, subject.label_b, subject.affine_b, label_value=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnannotatedModelWarning)
            result = insert_tumor(washed, subject.affine_a, source, model, InsertionParameters(seed=0))
        assert tumor_contrast(result.image, result.mask, subject.spacing_a) > 0
        assert tumor_contrast(subject.render_a(result.mask), result.mask, subject.spacing_a) > 0  # as the truth


def test_texture_seeds_differ_with_the_same_mean(simulated_model):
    subject = simulate_subject(1)
    washed = subject.render_b_washed_out()
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    results = [insert_tumor(washed, subject.affine_b, source, simulated_model, InsertionParameters(seed=s))
               for s in (0, 1)]
    mask = results[0].mask
    texture = results[0].record["appearance"]["texture"]
    assert texture["added_std"] > 0
    difference = np.abs(results[0].image - results[1].image)[mask].mean()
    assert difference >= 0.3 * texture["target_std"]
    means = [r.image[mask].mean() for r in results]
    assert abs(means[0] - means[1]) <= 0.05 * abs(means[0])
    # Without texture, the two seeds differ only by the pyramid's own (weak) noise.
    plain = [insert_tumor(washed, subject.affine_b, source, simulated_model,
                          InsertionParameters(seed=s, texture=False)) for s in (0, 1)]
    assert np.abs(plain[0].image - plain[1].image)[mask].mean() < 0.5 * difference


def test_inject_texture_matches_the_surroundings_energy():
    rng = np.random.default_rng(0)
    background = 100 + 5 * rng.standard_normal((4, 48, 48))
    mask = np.zeros(background.shape, bool)
    mask[:, 16:32, 16:32] = True
    smooth = np.where(mask, 60.0, background)
    surroundings = ring(mask, (1.0, 1.0), 6.0)
    out, info = inject_texture(smooth, background, mask, surroundings, seed=3)
    assert info["added_std"] == pytest.approx(info["target_std"], rel=0.05)  # the flat tumor had ~none
    assert robust_std(highpass(out)[mask & ~ring(~mask, (1.0, 1.0), 2.0)]) == pytest.approx(
        info["target_std"], rel=0.2)
    assert np.array_equal(out[~mask], smooth[~mask])
    assert abs(out[mask].mean() - 60.0) < 0.5


def test_partial_volume_edge():
    mask = np.zeros((1, 12, 12), bool)
    mask[0, 3:9, 3:9] = True
    fraction = partial_volume(mask, through_plane_px=0.0)
    assert np.all((fraction[mask] > 0.4) & (fraction[mask] <= 1))
    assert fraction[0, 6, 6] == pytest.approx(1.0, abs=1e-3) and fraction[0, 3, 6] < 0.9
    # Like a scanner's point-spread function, the blur reaches past the edge, and only just.
    assert 0.05 < fraction[0, 2, 6] < 0.5 and fraction[0, 0, 6] < 1e-3
    assert fraction[0, 2, 6] + fraction[0, 3, 6] == pytest.approx(1.0, abs=0.02)  # symmetric about the edge


def test_partial_volume_mixes_neighbouring_slices_only_when_asked():
    mask = np.zeros((3, 12, 12), bool)
    mask[1, 3:9, 3:9] = True
    across, within = partial_volume(mask), partial_volume(mask, through_plane_px=0.0)
    assert 0.05 < across[0, 6, 6] < 0.5 and across[1, 6, 6] < 0.95  # the slice profile
    assert np.all(within[0] == 0) and within[1, 6, 6] == pytest.approx(1.0, abs=1e-3)


def test_spread_outward_carries_the_nearest_tumor_value():
    values = np.zeros((2, 8, 8), np.float32)
    mask = np.zeros((2, 8, 8), bool)
    mask[0, 2:4, 2:4] = True
    values[0, 2:4, 2] = 10.0
    values[0, 2:4, 3] = 20.0
    spread = spread_outward(values, mask)
    assert spread[0, 3, 0] == 10.0 and spread[0, 2, 7] == 20.0  # from the nearest mask pixel, per slice
    assert np.array_equal(spread[0][mask[0]], values[0][mask[0]])
    assert np.array_equal(spread[1], values[1])  # a slice the mask does not touch is left alone


def test_soft_knee_keeps_the_ranks_of_an_enhancing_tumor():
    unit = np.array([-0.5, -0.1, 0.0, 0.05, 0.2, 0.5, 0.9, 1.0, 1.2, 1.5, 1.8])
    knee = soft_knee(unit)
    assert np.all(np.diff(knee) > 0)  # strictly increasing: no flat clipping
    assert np.allclose(knee[(unit >= 0.1) & (unit <= 1)], unit[(unit >= 0.1) & (unit <= 1)])
    assert knee.min() > 0 and knee.max() < 1.1
    rng = np.random.default_rng(0)
    source = rng.uniform(100, 200, (32, 32, 8))
    source[:4] = 0.0  # air
    source[10:14, 10:14, 2:6] = np.linspace(250, 400, 64).reshape(4, 4, 4)  # above p99.5
    mask = np.zeros(source.shape, bool)
    mask[10:14, 10:14, 2:6] = True
    target = rng.uniform(50, 300, (32, 32, 8))
    mapped = map_tumor_intensities(source, mask, target)[mask]
    assert len(np.unique(mapped)) == mask.sum()  # every voxel keeps its own value
    assert np.all(np.diff(mapped) > 0)


def test_percentiles_ignore_air():
    rng = np.random.default_rng(0)
    image = np.concatenate([rng.uniform(0, 5, 6000), rng.uniform(100, 200, 4000)])
    low, high = robust_range(image)
    assert low > 95 and high < 201
    assert robust_range(image, tissue_only=False)[0] < 5
    standardized = rng.normal(size=1000)  # negative values: no air to tell apart
    assert robust_range(standardized) == robust_range(standardized, tissue_only=False)


def test_health_flag_fires_on_a_deliberately_broken_scale(tmp_path, monkeypatch):
    from helpers import textured_slice

    broken_scale = {}
    original = training_module._ScaleTrainer.finish

    def finish(self):
        if not broken_scale:  # break the first trained scale: its residual becomes noise
            broken_scale["scale"] = self.scale
            with torch.no_grad():
                last = self.generator.body[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(0)))
                last.bias.fill_(0.5)
        return original(self)

    monkeypatch.setattr(training_module._ScaleTrainer, "finish", finish)
    with pytest.warns(TrainingHealthWarning, match="worse than its upsampled input") as caught:
        model = train_harmonizer(textured_slice(), TrainingConfig.preset("tiny", iterations=5), out_dir=tmp_path,
                                 seed=0, progress=False)
    assert any(f"Scale {broken_scale['scale']} " in str(w.message) for w in caught)
    log = json.loads((tmp_path / "training_log.json").read_text())
    entry = next(e for e in log if e["scale"] == broken_scale["scale"])
    assert entry["healthy"] is False and entry["improvement"] < 1
    assert model.metadata["training"]["log"][0]["healthy"] is False
    assert (tmp_path / f"samples_scale{broken_scale['scale']:02d}.png").exists()


def test_scale_health_rule():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scale_health(3, 0.05, 0.10) == {"healthy": True, "improvement": pytest.approx(2.0)}
    with pytest.warns(TrainingHealthWarning, match="Scale 4"):
        assert scale_health(4, 0.12, 0.10)["healthy"] is False


def test_preset_overrides_are_validated():
    config = TrainingConfig.preset("fast", iterations=50)
    assert config.iterations == 50 and config.trained_scales == TrainingConfig.preset("fast").trained_scales
    assert TrainingConfig.preset("fast", iterations=None) == TrainingConfig.preset("fast")
    with pytest.raises(SinganInsertError, match="Unknown training setting"):
        TrainingConfig.preset("fast", iteration=50)
    with pytest.raises(SinganInsertError, match="iterations"):
        TrainingConfig.preset("tiny", iterations=0)
    with pytest.raises(SinganInsertError, match="integer"):
        TrainingConfig.preset("tiny", iterations=2.5)
    with pytest.raises(SinganInsertError, match="Unknown preset"):
        TrainingConfig.preset("quick")


def test_model_file_without_training_slice_falls_back_to_the_fixed_appearance(tiny_harmonizer, tmp_path):
    old = Harmonizer(tiny_harmonizer.pyramid, tiny_harmonizer.geometry, tiny_harmonizer.normalization,
                     tiny_harmonizer.spacing, tiny_harmonizer.reconstruction_noise, tiny_harmonizer.metadata)
    old.save(tmp_path / "old.safetensors")
    loaded = Harmonizer.load(tmp_path / "old.safetensors")
    assert loaded.training_slice is None
    assert Harmonizer.load(tiny_harmonizer_path(tiny_harmonizer, tmp_path)).training_slice is not None
    from test_volume import AFFINE, SHAPE, TUMOR, synthetic_volume

    image, label = synthetic_volume(1, tumor=TUMOR)
    source = SourceTumor.from_arrays(image, label, AFFINE)
    target, _ = synthetic_volume(2)
    with pytest.warns(UserWarning, match="appearance='fixed'"):
        result = insert_tumor(target, AFFINE, source, loaded, InsertionParameters(seed=0))
    fixed = insert_tumor(target, AFFINE, source, loaded, InsertionParameters(seed=0, appearance="fixed"))
    assert np.array_equal(result.image, fixed.image)
    assert result.record["parameters"]["appearance"] == "fixed"


def tiny_harmonizer_path(harmonizer, folder):
    path = folder / "new.safetensors"
    harmonizer.save(path)
    return path


def test_appearance_parameters_are_validated():
    with pytest.raises(SinganInsertError, match="appearance"):
        InsertionParameters(appearance="manual")
    with pytest.raises(SinganInsertError, match="visibility_floor"):
        InsertionParameters(visibility_floor=0.6)
    with pytest.raises(SinganInsertError, match="texture"):
        InsertionParameters(texture="yes")
    params = InsertionParameters(appearance="fixed", texture=True)
    assert InsertionParameters.from_dict(params.to_dict()) == params


# ------------------------------------------------------------------ restoration training (mask channel)
def test_restoration_objective_lowers_the_restoration_error():
    from helpers import textured_slice
    from singan_insert.harmonizer.training import restoration_error

    errors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        for weight in (0.0, 10.0):
            # Only the finest scale is trained: the one restoration_error measures.
            config = TrainingConfig.preset("tiny", arch="singan-mask", restoration_weight=weight,
                                           iterations=100, trained_scales=1)
            model = train_harmonizer(textured_slice(), config, seed=0, progress=False)
            errors[weight] = restoration_error(model, seed=123, num=30)
    # Measured: 0.391 without, 0.376 with the objective (a tiny 8-filter generator).
    assert errors[10.0] < 0.98 * errors[0.0], errors


def test_architecture_is_recorded_and_old_files_load_as_singan(tmp_path):
    from helpers import textured_slice
    from singan_insert.harmonizer.model_file import load_tensors, save_tensors
    from singan_insert.harmonizer.networks import build_generator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        model = train_harmonizer(textured_slice(), TrainingConfig.preset("tiny", arch="singan-mask", iterations=3),
                                 out_dir=tmp_path / "mask", seed=0, progress=False)
    loaded = Harmonizer.load(tmp_path / "mask")
    assert all(g.mask_channel for g in loaded.pyramid.generators)
    tensors, meta = load_tensors(tmp_path / "mask" / "harmonizer.safetensors", "singan-insert-harmonizer")
    assert meta["arch"] == "singan-mask"
    # The mask reaches the generators: with it the result differs from a zero mask's.
    background = np.asarray(textured_slice(), np.float32)
    mask = np.zeros(background.shape, np.float32)
    mask[20:30, 20:30] = 1
    composite = np.where(mask > 0, background * 0.5, background)
    with_mask = loaded.harmonize(background, composite, mask, -1, seed=0, dilation_mm=30, feather_mm=0)
    assert np.isfinite(with_mask).all()
    # A file written without "arch" (earlier versions) loads as the official architecture.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        plain = train_harmonizer(textured_slice(), TrainingConfig.preset("tiny", iterations=3), seed=0, progress=False)
    plain.save(tmp_path / "plain.safetensors")
    tensors, meta = load_tensors(tmp_path / "plain.safetensors", "singan-insert-harmonizer")
    del meta["arch"]
    for key in ("format", "format_version", "kind"):
        meta.pop(key, None)
    save_tensors(tmp_path / "old.safetensors", tensors, "singan-insert-harmonizer", meta)
    old = Harmonizer.load(tmp_path / "old.safetensors")
    assert not any(g.mask_channel for g in old.pyramid.generators)
    with pytest.raises(SinganInsertError, match="architecture"):
        build_generator("unet")
    with pytest.raises(SinganInsertError, match="singan-mask"):
        TrainingConfig.preset("tiny", restoration_weight=1.0)


def test_the_partial_volume_edge_has_the_scanner_like_seam_a_cut_edge_lacks(tiny_harmonizer):
    # The simulator blurs its tumors like a scanner's point-spread function (within and across
    # slices, on both sides of the edge). A flat tumor at the truth's own level, rendered with the
    # library's edge, must have a seam closer to the truth's than the same tumor with a fraction
    # cut to 0 at the mask, in-plane only (the edge before 2026-12-03).
    from singan_insert.evaluation.experiments import QualitySubject
    from singan_insert.evaluation.metrics import harmonization_fidelity

    case = QualitySubject.prepare("s", simulate_subject(201, shape=(96, 96, 32)), tiny_harmonizer)
    cut = np.moveaxis(partial_volume(np.moveaxis(case.mask, case.axis, 0), through_plane_px=0.0), 0, case.axis)
    cut = np.where(case.mask, cut, 0.0)
    level = float(case.truth[case.mask].mean())

    def seam(image):
        b = case.box
        return harmonization_fidelity(image[b], case.truth[b], case.mask[b], case.spacing,
                                      value_range=case.value_range, sigma_px=case.sigma_px).seam_ratio

    ours = seam(case.flat_at_truth_level())
    cut_edge = seam(case.washed_out + cut * (level - case.washed_out))
    assert abs(ours - 1.0) < abs(cut_edge - 1.0) and 0.9 < ours < 1.08, (ours, cut_edge)


def test_a_tumor_cut_by_the_field_of_view_keeps_its_fraction_at_the_cut():
    from singan_insert.insertion.insert import _tumor_fraction

    mask = np.zeros((12, 12, 8), bool)
    mask[3:9, 3:9, 0:5] = True  # cut by the volume's first slice (clip_to_fov), ends inside at slice 4
    crop = (slice(1, 11), slice(1, 11), slice(0, 5))
    fraction = _tumor_fraction(mask, crop, axis=2)  # (slices, H, W)
    centre = fraction[:, 5, 5]
    assert centre[0] == pytest.approx(1.0, abs=1e-3)  # the tumor goes on beyond the cut: no falloff there
    assert centre[4] < 0.9 and centre[1:4] == pytest.approx(1.0, abs=1e-3)  # but it does end at slice 4
    assert fraction[0, 2, 5] == pytest.approx(fraction[2, 2, 5])  # the in-plane edge is as everywhere


def test_a_single_slice_target_gets_no_through_plane_mixing():
    from singan_insert.insertion.insert import _tumor_fraction

    mask = np.zeros((12, 12, 1), bool)
    mask[3:9, 3:9, 0] = True
    fraction = _tumor_fraction(mask, (slice(0, 12), slice(0, 12), slice(0, 1)), axis=2)
    np.testing.assert_allclose(fraction, partial_volume(np.moveaxis(mask, 2, 0), through_plane_px=0.0), atol=1e-6)


@pytest.mark.parametrize("voxels", [1, 2, 3])
def test_inject_texture_never_amplifies_the_noise_of_a_tumor_of_a_few_voxels(voxels):
    # Over one voxel the noise's sample sd is 0: dividing by it multiplied the noise by 1e12.
    rng = np.random.default_rng(0)
    background = 100 + 5 * rng.standard_normal((3, 32, 32))
    mask = np.zeros(background.shape, bool)
    mask[1, 16, 16:16 + voxels] = True
    smooth = np.where(mask, 60.0, background)
    surroundings = ring(mask, (1.0, 1.0), 6.0)
    for seed in range(8):
        out, info = inject_texture(smooth, background, mask, surroundings, seed=seed)
        assert info["added_std"] > 0  # texture was added...
        # ...at most a few field sds away from the level (a Gaussian beyond 8 sd: never).
        assert np.abs(out[mask] - 60.0).max() <= 8 * 2 * info["added_std"]


def test_one_voxel_tumor_is_inserted_at_a_plausible_value(tiny_harmonizer):
    subject = simulate_subject(1, shape=(64, 64, 32))
    washed = subject.render_b_washed_out().astype(np.float32)
    label = np.zeros(subject.label_a.shape, np.uint8)
    centre = tuple(int(round(c.mean())) for c in np.nonzero(subject.label_a == 1))
    label[centre] = 1
    source = SourceTumor.from_arrays(subject.image_a, label, subject.affine_a)
    for seed in range(4):
        result = insert_tumor(washed, subject.affine_b, source, tiny_harmonizer, InsertionParameters(seed=seed))
        inside = result.image[result.mask]
        assert inside.size >= 1 and washed.min() <= inside.min() and inside.max() <= washed.max()
        assert result.record["tumor"]["output_mean"] == pytest.approx(float(inside.mean()), rel=1e-5)


@pytest.mark.parametrize("spacing", [(-0.4, 0.4), (0.0, 0.4), (float("nan"), 0.4), (0.4, 0.4, 1.0), (0.4,)])
def test_training_refuses_a_bad_spacing_before_it_trains(spacing, monkeypatch):
    image, _, _ = training_slice_from_subject(simulate_subject(0, shape=(64, 64, 32)))
    monkeypatch.setattr(training_module, "_ScaleTrainer",
                        lambda *a, **k: pytest.fail("trained before checking the spacing"))
    with pytest.raises(SinganInsertError, match="spacing"):
        train_harmonizer(image, TrainingConfig.preset("tiny", iterations=1), spacing=spacing, progress=False)


@pytest.mark.parametrize("kwargs", [dict(spacing=(0.0, 0.4)), dict(spacing=(-0.4, 0.4)), dict(dilation_mm=float("nan")),
                                    dict(feather_mm=float("inf")), dict(feather_mm=-1.0)])
def test_harmonize_refuses_bad_geometry_arguments_clearly(tiny_harmonizer, kwargs):
    size = tiny_harmonizer.geometry.finest
    background = np.full((1, *size), 0.5, np.float32) + np.random.default_rng(0).random((1, *size), np.float32)
    mask = np.zeros_like(background)
    mask[0, size[0] // 2 - 3:size[0] // 2 + 3, size[1] // 2 - 3:size[1] // 2 + 3] = 1
    with pytest.raises(SinganInsertError, match="spacing|dilation_mm|feather_mm"):
        tiny_harmonizer.harmonize(background, background, mask, **kwargs)


def test_an_annotation_holding_several_labels_is_refused(tiny_harmonizer):
    size = tiny_harmonizer.geometry.finest
    labels = np.zeros(size, np.uint8)
    labels[10:16, 10:16] = 1
    labels[20:22, 20:22] = 2  # crossMoDA's cochlea
    with pytest.raises(SinganInsertError, match="several labels"):
        tiny_harmonizer.copy().annotate(labels)
    # The tumor's own mask, a drawn 0/255 image with grey edges, and a soft mask are masks.
    drawn = np.where(labels == 1, 255, 0).astype(np.uint8)
    drawn[9, 10:16] = 128
    for mask in (labels == 1, drawn, (labels == 1) * 0.9):
        assert tiny_harmonizer.copy().annotate(mask).tumor_annotation is not None


@pytest.mark.parametrize("label, value, message", [
    (np.zeros((64, 64, 32), bool), 2, "boolean"),
    (np.full((64, 64, 32), 0.5, np.float32), 1, "fractional"),
    (np.where(np.arange(64 * 64 * 32).reshape(64, 64, 32) == 5, np.nan, 0).astype(np.float32), 1, "NaN"),
])
def test_insert_refuses_a_target_label_that_cannot_hold_the_tumor(tiny_harmonizer, label, value, message):
    subject = simulate_subject(1, shape=(64, 64, 32))
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    with pytest.raises(SinganInsertError, match=message):
        insert_tumor(subject.render_b_washed_out(), subject.affine_b, source, tiny_harmonizer,
                     InsertionParameters(seed=0, label_value=value), target_label=label)


def test_an_image_too_large_for_float32_arithmetic_is_refused_clearly(tiny_harmonizer):
    subject = simulate_subject(1, shape=(64, 64, 32))
    source = SourceTumor.from_arrays(subject.image_a, subject.label_a, subject.affine_a, label_value=1)
    huge = subject.render_b_washed_out().astype(np.float32) * np.float32(1e34)  # finite, but near float32's limit
    with pytest.raises(SinganInsertError, match="Rescale"):
        insert_tumor(huge, subject.affine_b, source, tiny_harmonizer, InsertionParameters(seed=0))


@pytest.mark.parametrize("kwargs", [dict(axis=True), dict(axis=1.0), dict(visibility_floor=False)])
def test_insertion_parameters_refuse_booleans_and_floats_for_an_axis_or_a_floor(kwargs):
    with pytest.raises(SinganInsertError, match="axis|visibility_floor"):
        InsertionParameters(**kwargs)
