"""MONAI dictionary transforms (singan_insert.integrations.monai) with the real MONAI."""

from __future__ import annotations

import importlib
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

monai = pytest.importorskip("monai")

from monai.data import (  # noqa: E402
    CacheDataset,
    DataLoader,
    Dataset,
    MetaTensor,
    PersistentDataset,
    list_data_collate,
)
from monai.transforms import Compose, Orientationd, Spacingd  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from singan_insert.errors import MissingExtraError, SinganInsertError  # noqa: E402
from singan_insert.insertion.insert import InsertionParameters, insert_tumor  # noqa: E402
from singan_insert.insertion.placement import Placement, SourceTumor  # noqa: E402
from singan_insert.integrations.monai import RandTumorInsertiond, TumorInsertiond  # noqa: E402
from singan_insert.integrations.torchio import load_harmonizer  # noqa: E402

SHAPE = (40, 40, 16)
# Anisotropic, with a flipped axis, so that Orientationd and Spacingd both have work to do.
AFFINE = np.array([[-0.5, 0, 0, 10], [0, 0.5, 0, -5], [0, 0, 1.5, 2], [0, 0, 0, 1]])


def volume(seed: int, tumor: bool = False):
    rng = np.random.default_rng(seed)
    image = 100 + ndimage.gaussian_filter(rng.normal(size=SHAPE), (2, 2, 0.7)) * 60
    grids = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, (20, 20, 8), (6, 5, 2))) <= 1
    if tumor:
        image = np.where(mask, 55 + 10 * rng.normal(size=SHAPE), image)
    return image.astype(np.float32), mask.astype(np.uint8)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir / "harmonizer.safetensors")


@pytest.fixture(scope="module")
def source():
    image, label = volume(1, tumor=True)
    return SourceTumor.from_arrays(image, label, AFFINE)


def sample(seed: int = 2) -> dict:
    image, _ = volume(seed)
    brain = np.zeros(SHAPE, np.uint8)
    brain[8:32, 8:32, 6:10] = 1
    return {"image": MetaTensor(torch.from_numpy(image[None]), affine=torch.from_numpy(AFFINE)),
            "brain": MetaTensor(torch.from_numpy(brain[None]), affine=torch.from_numpy(AFFINE)),
            "case": f"case{seed}"}


def random_transform(model, source, **kwargs) -> RandTumorInsertiond:
    kwargs = {"placement_key": "brain", "record_key": "record", **kwargs}
    return RandTumorInsertiond("image", model, [source], **kwargs)


# ---------------------------------------------------------------- deterministic transform
def test_deterministic_matches_insert_tumor_and_keeps_metadata(model, source):
    parameters = InsertionParameters(placement=Placement(location=(20, 21, 8)), seed=3)
    data = sample()
    data["image"].meta["filename_or_obj"] = "case2_hrT2.nii.gz"
    out = TumorInsertiond("image", model, source, parameters, record_key="record")(data)
    expected = insert_tumor(data["image"][0].numpy(), AFFINE, source, load_harmonizer(model), parameters)
    assert isinstance(out["image"], MetaTensor) and isinstance(out["label"], MetaTensor)
    np.testing.assert_array_equal(out["image"][0].numpy(), expected.image)
    np.testing.assert_array_equal(out["label"][0].numpy(), expected.label)
    for key in ("image", "label"):
        np.testing.assert_allclose(out[key].affine.numpy(), AFFINE)
    assert out["image"].meta["filename_or_obj"] == "case2_hrT2.nii.gz"
    assert out["case"] == "case2" and not torch.equal(out["image"], data["image"])  # input untouched
    assert json.loads(out["record"])["parameters"] == expected.record["parameters"]


def test_an_itk_lps_affine_places_the_tumor_where_the_ras_one_does(model, source):
    parameters = InsertionParameters(seed=3)  # where the tumor physically is: the world matters
    ras = sample()
    lps = sample()
    lps["image"] = MetaTensor(ras["image"].clone(), affine=torch.from_numpy(np.diag([-1.0, -1, 1, 1]) @ AFFINE),
                              meta={"space": "LPS"})
    expected = TumorInsertiond("image", model, source, parameters)(ras)
    out = TumorInsertiond("image", model, source, parameters)(lps)
    np.testing.assert_array_equal(out["image"][0].numpy(), expected["image"][0].numpy())
    np.testing.assert_array_equal(out["label"][0].numpy(), expected["label"][0].numpy())
    assert out["label"][0].numpy().any()


def test_a_plain_array_is_taken_as_stored_like_the_model_s_file(model, source, tmp_path):
    from singan_insert import Harmonizer

    lps_model = Harmonizer.load(model)
    lps_model.metadata["provenance"] = {**lps_model.provenance, "orientation": "LPS"}
    path = lps_model.save(tmp_path / "lps.safetensors")
    parameters = InsertionParameters(placement=Placement(location=(20, 21, 8)), seed=3)
    image = volume(2)[0]
    out = TumorInsertiond("image", str(path), source, parameters, record_key="record")({"image": image[None]})
    assert "orientation" not in json.loads(out["record"])  # not mirrored into the model's LPS
    # Its voxel axes run as the model file's do (L, P, S): no axis is flipped for the model.
    expected = insert_tumor(image, np.diag([-1.0, -1, 1, 1]), source, load_harmonizer(str(path)), parameters)
    np.testing.assert_array_equal(np.asarray(out["image"])[0], expected.image)
    assert "orientation" not in expected.record


def test_existing_label_keeps_its_values_and_metadata(model, source):
    data = sample()
    label = np.zeros((1, *SHAPE), np.uint8)
    label[0, 2:5, 2:5, 2:4] = 2
    data["label"] = MetaTensor(torch.from_numpy(label), affine=torch.from_numpy(AFFINE),
                               meta={"filename_or_obj": "case2_Label.nii.gz"})
    parameters = InsertionParameters(placement=Placement(location=(20, 21, 8)))
    out = TumorInsertiond("image", model, source, parameters)(data)
    assert set(torch.unique(out["label"]).tolist()) == {0, 1, 2}
    assert out["label"].meta["filename_or_obj"] == "case2_Label.nii.gz"
    assert out["label"].dtype == torch.uint8


def test_spacing_and_orientation_after_insertion_keep_image_and_label_on_one_grid(model, source):
    pipeline = Compose([
        random_transform(model, source),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
    ])
    pipeline.set_random_state(0)
    out = pipeline(sample())
    assert out["image"].shape == out["label"].shape
    np.testing.assert_allclose(out["image"].affine.numpy(), out["label"].affine.numpy())
    np.testing.assert_allclose(np.abs(np.diag(out["image"].affine.numpy())[:3]), 1.0)
    assert out["image"].affine[0, 0] > 0  # RAS now: the flipped x axis was reoriented
    # The tumor label still lies where the image changed (both resampled on the same grid).
    changed = Compose([Orientationd(keys=["image"], axcodes="RAS"),
                       Spacingd(keys=["image"], pixdim=(1.0, 1.0, 1.0))])(sample())["image"]
    difference = (out["image"] - changed).abs()[0]
    tumor = out["label"][0] > 0
    assert tumor.any() and difference[tumor].mean() > 5 * difference[~tumor].mean()


# ---------------------------------------------------------------- random transform
def test_random_transform_is_reproducible_and_prob_skips_with_a_label(model, source):
    transform = random_transform(model, source)
    first = transform.set_random_state(7)(sample())
    second = transform.set_random_state(7)(sample())
    third = transform.set_random_state(8)(sample())
    assert torch.equal(first["image"], second["image"]) and first["record"] == second["record"]
    assert first["record"] != third["record"]
    record = json.loads(first["record"])
    location = record["parameters"]["placement"]["location"]
    assert sample()["brain"][0][tuple(int(v) for v in location)] == 1  # inside the region
    skipped = random_transform(model, source, prob=0.0)(sample())
    assert torch.equal(skipped["image"], sample()["image"]) and skipped["record"] == ""
    assert skipped["label"].shape == skipped["image"].shape and skipped["label"].sum() == 0
    assert isinstance(skipped["label"], MetaTensor)
    np.testing.assert_allclose(skipped["label"].affine.numpy(), AFFINE)


def test_set_determinism_reproduces_a_compose(model, source):
    def run():
        set_determinism(seed=11)
        try:
            return Compose([random_transform(model, source)])(sample())["record"]
        finally:
            set_determinism(seed=None)

    assert run() == run() != ""


def test_transforms_pickle_small_without_the_network(model, source):
    transform = random_transform(model, source)
    transform(sample())  # the model is loaded now, in this process's cache only
    # Its sources plus a few kB of settings and random state: no network (the tiny one is 28 kB).
    assert len(pickle.dumps(transform)) < len(pickle.dumps(transform.sources)) + 10_000
    clone = pickle.loads(pickle.dumps(transform))
    assert clone.set_random_state(3)(sample())["record"] == transform.set_random_state(3)(sample())["record"]


def test_cache_and_persistent_datasets_cache_only_the_deterministic_part(model, source, tmp_path):
    parameters = InsertionParameters(placement=Placement(location=(20, 21, 8)))
    transforms = Compose([TumorInsertiond("image", model, source, parameters, label_key="first"),
                          random_transform(model, source)])
    transforms.set_random_state(0)
    for dataset in (CacheDataset([sample(2), sample(3)], transforms, progress=False),
                    PersistentDataset([sample(2), sample(3)], transforms, cache_dir=tmp_path)):
        epoch1, epoch2 = dataset[0], dataset[0]
        assert torch.equal(epoch1["first"], epoch2["first"]) and epoch1["first"].sum() > 0
        assert epoch1["record"] != epoch2["record"]  # the random part runs every time


def test_dataloader_with_two_spawned_workers(model, source):
    dataset = Dataset([sample(s) for s in range(4)], random_transform(model, source))
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    assert [tuple(b["image"].shape) for b in batches] == [(2, 1, *SHAPE)] * 2
    assert all(isinstance(b["label"], MetaTensor) and b["label"].sum() > 0 for b in batches)
    records = [r for b in batches for r in b["record"]]
    assert len(set(records)) == 4  # each worker draws its own insertions


def test_output_types_do_not_depend_on_the_draw_so_samples_collate(model, source):
    """MONAI's convention, inserted or skipped: numpy stays numpy, a tensor a tensor, and a
    MetaTensor image makes the label a MetaTensor; an integer image comes out float32."""
    image, brain = np.asarray(sample()["image"]), np.asarray(sample()["brain"])
    label = np.zeros_like(brain)
    label[0, 2:5, 2:5, 2:4] = 2
    transform = random_transform(model, source, prob=0.5)
    inputs = {
        "numpy": lambda: {"image": image.astype(np.int16), "brain": brain, "label": label},
        "numpy, no label": lambda: {"image": image, "brain": brain},
        "tensor": lambda: {"image": torch.from_numpy(image), "brain": torch.from_numpy(brain)},
        "MetaTensor image, numpy label": lambda: {**sample(), "label": label},
    }
    expected = {"numpy": (np.ndarray, np.ndarray), "numpy, no label": (np.ndarray, np.ndarray),
                "tensor": (torch.Tensor, torch.Tensor),
                "MetaTensor image, numpy label": (MetaTensor, MetaTensor)}
    for name, make in inputs.items():
        outputs = [transform.set_random_state(seed)(make()) for seed in range(4)]
        assert {out["record"] == "" for out in outputs} == {True, False}, name  # both branches
        for out in outputs:
            assert tuple(type(out[k]) for k in ("image", "label")) == expected[name], name
            assert str(out["image"].dtype).endswith("float32"), name
            assert out["label"].shape == out["image"].shape, name
        batch = list_data_collate(outputs)
        assert tuple(batch["image"].shape) == (4, 1, *SHAPE) and batch["image"].dtype == torch.float32
        assert tuple(batch["label"].shape) == (4, 1, *SHAPE)
        if "label" in make():
            skipped = next(out for out in outputs if out["record"] == "")
            np.testing.assert_array_equal(np.asarray(skipped["label"]), label)  # kept as it was


def test_placement_draws_among_the_voxels_where_the_tumor_fits(model, source):
    data = sample()
    region = np.ones((1, *SHAPE), np.uint8)
    region[0, 5:-5, 5:-5, :] = 0  # a border shell: the tumor fits at none of its voxels...
    region[0, 19:22, 19:22, 7:10] = 1  # ...but at these 27
    data["brain"] = MetaTensor(torch.from_numpy(region), affine=torch.from_numpy(AFFINE))
    transform = random_transform(model, source, degrees=0, scale=0, flip_axes=())
    for seed in range(3):
        record = json.loads(transform.set_random_state(seed)(dict(data))["record"])
        location = record["parameters"]["placement"]["location"]
        assert all(19 <= v <= 21 for v in location[:2]) and 7 <= location[2] <= 9
    region[0, 19:22, 19:22, 7:10] = 0
    data["brain"] = MetaTensor(torch.from_numpy(region), affine=torch.from_numpy(AFFINE))
    with pytest.raises(SinganInsertError, match=r"fits nowhere in the placement region 'brain' of "
                                                r"the \(40, 40, 16\) volume.*2 draw.*max_attempts"):
        random_transform(model, source, max_attempts=2)(data)


def test_a_placement_map_of_several_labels_needs_placement_values_as_in_torchio(model, source):
    data = sample()
    region = np.zeros((1, *SHAPE), np.uint8)
    region[0, 8:20, 8:32, 6:10] = 1
    region[0, 20:32, 8:32, 6:10] = 2  # e.g. a schwannoma (1) beside a cochlea (2): which is meant?
    data["brain"] = MetaTensor(torch.from_numpy(region), affine=torch.from_numpy(AFFINE))
    transform = random_transform(model, source, degrees=0, scale=0, flip_axes=())
    with pytest.raises(SinganInsertError, match=r"placement region 'brain' holds several labels \(1, 2\).*"
                                                r"placement_values"):
        transform(dict(data))
    chosen = random_transform(model, source, degrees=0, scale=0, flip_axes=(), placement_values=(2,))
    for seed in range(2):
        record = json.loads(chosen.set_random_state(seed)(dict(data))["record"])
        location = record["parameters"]["placement"]["location"]
        assert region[(0, *np.round(location).astype(int))] == 2
    data["brain"] = MetaTensor(torch.from_numpy(region.astype(np.float32) / 2), affine=torch.from_numpy(AFFINE))
    with pytest.raises(SinganInsertError, match=r"\(0\.5, 1\).*not all integers.*nearest-neighbour"):
        transform(dict(data))  # e.g. a mask resampled with linear interpolation
    data["brain"] = MetaTensor(torch.from_numpy((region > 0).astype(np.float32)), affine=torch.from_numpy(AFFINE))
    assert json.loads(transform.set_random_state(0)(dict(data))["record"])  # one value: any non-zero voxel


def test_arguments_are_checked_at_construction_as_in_torchio(model, source):
    bad = [({"placement_values": (1.5,)}, "placement_values must be an integer"),
           ({"placement_values": ()}, "placement_values"),
           ({"placement_key": 3}, "placement_key must be an image key"),
           ({"placement_key": "label"}, "placement_values=\\(\\.\\.\\.\\)"),  # the map receiving the tumor
           ({"label_key": None}, "label_key must be a non-empty string"),
           ({"label_key": ""}, "label_key"),
           ({"record_key": 5}, "record_key"),
           ({"device": "gpu"}, "Unknown device 'gpu'"),
           ({"modality": 2}, "modality")]
    for kwargs, message in bad:
        with pytest.raises(SinganInsertError, match=message):
            RandTumorInsertiond("image", model, [source], **kwargs)
    with pytest.raises(SinganInsertError, match="Unknown device"):
        TumorInsertiond("image", model, source, device="gpu")
    in_place = RandTumorInsertiond("image", model, [source], placement_key="label",
                                   placement_values=np.int64(1), device=torch.device("cpu"))
    assert in_place.placement_values == (1,) and in_place.device == "cpu"


# ---------------------------------------------------------------- errors
def test_bad_input_gives_clear_errors(model, source):
    with pytest.raises(SinganInsertError, match="ONE image"):
        RandTumorInsertiond(["image", "other"], model, [source])
    with pytest.raises(SinganInsertError, match="prob"):
        RandTumorInsertiond("image", model, [source], prob=1.5)
    with pytest.raises(SinganInsertError, match="contrast"):
        RandTumorInsertiond("image", model, [source], contrast=(0.8, 0.5),
                            parameters=InsertionParameters(appearance="fixed"))
    with pytest.raises(SinganInsertError, match="EnsureChannelFirstd"):
        TumorInsertiond("image", model, source)({"image": torch.zeros(SHAPE)})
    with pytest.raises(SinganInsertError, match="no image 'image'"):
        TumorInsertiond("image", model, source)({"other": torch.zeros(1, *SHAPE)})
    passed = TumorInsertiond("image", model, source, allow_missing_keys=True)({"other": 1})
    assert passed == {"other": 1}
    with pytest.raises(SinganInsertError, match="placement region 'brain' is not"):
        random_transform(model, source)({"image": sample()["image"]})
    shifted = sample()
    shifted["label"] = MetaTensor(torch.zeros(1, *SHAPE, dtype=torch.uint8), affine=torch.eye(4))
    with pytest.raises(SinganInsertError, match="label"):
        TumorInsertiond("image", model, source)(shifted)  # the label is on another grid


def test_missing_monai_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # makes `import monai...` fail
    for name in [m for m in sys.modules if m.startswith("monai.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "singan_insert.integrations.monai", raising=False)
    with pytest.raises(MissingExtraError, match=r"singan-insert\[monai\]"):
        importlib.import_module("singan_insert.integrations.monai")
