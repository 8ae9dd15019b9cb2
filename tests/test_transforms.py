import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from imgx3d.config import DataConfig
from imgx3d.data.catalog import find_cases
from imgx3d.data.geometry import RAS, grid_map, image_to_model, label_to_model, reorient, to_native
from imgx3d.data.io import Volume
from imgx3d.data.transforms import PatchBatches, Preprocessor, train_transforms


@pytest.mark.parametrize("codes", ["PIR", "LPS", "RAS", "ILA"])
def test_reorient_matches_nibabel_and_inverts(codes):
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(codes), RAS)
    a = torch.rand(2, 3, 4, 5)
    ras = reorient(a, transform)
    expected = np.moveaxis(nib.orientations.apply_orientation(np.moveaxis(a.numpy(), 0, -1), transform), -1, 0)
    np.testing.assert_array_equal(ras.numpy(), expected)
    assert torch.equal(reorient(ras, nib.orientations.ornt_transform(RAS, transform)), a)


def _volume(shape, affine):
    return Volume(np.zeros(shape, np.float32), affine)


def test_label_goes_to_model_space_and_back_exactly_without_resampling():
    affine = np.array([[0, 0, -1.5, 0], [-1, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # stored PIR-like
    pre = Preprocessor(DataConfig())
    label = np.random.default_rng(0).integers(0, 3, size=(5, 6, 7))
    grid = grid_map(_volume(label.shape, affine), pre.cfg)
    model = label_to_model(label, grid)
    assert tuple(model.shape[1:]) == grid.model_shape == grid.ras_shape
    onehot = torch.nn.functional.one_hot(model[0].long(), 3).permute(3, 0, 1, 2).float()
    np.testing.assert_array_equal(to_native(onehot, grid).argmax(0).numpy(), label)


def test_resampling_to_target_spacing_round_trips():
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    pre = Preprocessor(DataConfig(spacing=[1.6, 1.6, 1.5]))
    label = np.zeros((40, 40, 10), np.int64)
    label[10:30, 12:28, 3:8] = 1
    grid = grid_map(_volume(label.shape, affine), pre.cfg)
    assert grid.model_shape == (20, 20, 20)
    model = label_to_model(label, grid)
    onehot = torch.nn.functional.one_hot(model[0].long(), 2).permute(3, 0, 1, 2).float()
    back = to_native(onehot, grid).argmax(0).numpy()
    assert back.shape == label.shape
    assert (back == label).mean() > 0.98


def test_patch_batches_are_a_function_of_step(msd_dataset):
    cfg = DataConfig(patch_size=[16, 16, 16], batch_size=2)
    catalog = find_cases(msd_dataset)
    pre = Preprocessor(cfg)
    items = [pre.load_case(c, catalog.labels) for c in catalog.cases[:4]]
    transform = train_transforms(cfg)
    one = list(PatchBatches(items, transform, 2, seed=5, start_step=0, stop_step=6))
    resumed = list(PatchBatches(items, train_transforms(cfg), 2, seed=5, start_step=3, stop_step=6))
    workers = list(DataLoader(PatchBatches(items, train_transforms(cfg), 2, seed=5, start_step=0, stop_step=6),
                              batch_size=None, num_workers=2))
    other_seed = PatchBatches(items, transform, 2, seed=6, start_step=0, stop_step=1).batch(0)
    assert one[0]["image"].shape == (2, 1, 16, 16, 16) and one[0]["label"].shape == (2, 1, 16, 16, 16)
    assert len(one) == 6 and len(resumed) == 3 and len(workers) == 6
    for a, b in zip(one[3:], resumed, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    for a, b in zip(one, workers, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(one[0]["image"], one[1]["image"]), "steps draw different patches"
    assert not torch.equal(one[0]["image"], other_seed["image"])


def test_indices_computed_once_give_the_patches_of_a_rescan_and_labels_are_stored_small(msd_dataset, monkeypatch):
    import monai.transforms.croppad.array as croppad

    from imgx3d.data.transforms import PatchBatches, crop_indices

    cfg = DataConfig(patch_size=[16, 16, 16], batch_size=2)
    catalog = find_cases(msd_dataset)
    items = [Preprocessor(cfg).load_case(c, catalog.labels) for c in catalog.cases[:4]]
    assert all(item["label"].dtype == torch.uint8 for item in items), "labels cached as uint8, not int64"
    scans = []
    real = croppad.map_binary_to_indices
    monkeypatch.setattr(croppad, "map_binary_to_indices", lambda *a, **k: scans.append(1) or real(*a, **k))
    # MONAI's rescan on int64 labels: on uint8 ones it negates bitwise and every voxel is a background centre
    wide = [{**item, "label": item["label"].long()} for item in items]
    rescanned = list(PatchBatches(wide, train_transforms(cfg), 2, seed=5, start_step=0, stop_step=5))
    assert len(scans) == 10, "MONAI's own path scans the label for every patch"
    scans.clear()
    once = list(PatchBatches(items, train_transforms(cfg), 2, seed=5, start_step=0, stop_step=5, patch_size=[16] * 3))
    assert scans == [], "with precomputed indices the sampler never rescans"
    for a, b in zip(rescanned, once, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert b["label"].dtype == torch.int64
    indices = crop_indices(items[0]["label"], [16, 16, 16])
    assert indices["fg_indices"].dtype == torch.int32
    assert len(indices["fg_indices"]) == int((items[0]["label"] > 0).sum())
    assert len(indices["bg_indices"]) == int((items[0]["label"] == 0).sum()), "the background is not every voxel"


def test_cases_over_the_cache_bound_are_read_when_drawn_and_give_the_same_patches(msd_dataset, monkeypatch):
    from imgx3d.config import load_config
    from imgx3d.data.transforms import DeferredCase, PatchBatches, item_bytes
    from imgx3d.training import workflow

    cfg = load_config(None, ["data.patch_size=[16,16,16]", "data.batch_size=2"]).data
    catalog = find_cases(msd_dataset)
    pre = Preprocessor(cfg)
    ids = [c.case_id for c in catalog.cases[:4]]
    cached = workflow._load_items(pre, catalog, ids)
    one_case = item_bytes(cached[0])
    bounded = workflow._load_items(pre, catalog, ids, cache_gib=2.5 * one_case / 2**30)
    assert [isinstance(i, DeferredCase) for i in bounded] == [False, False, True, True], "two cases fit the bound"
    loads = []
    real_load = DeferredCase.load
    monkeypatch.setattr(DeferredCase, "load", lambda self, patch: loads.append(self.case.case_id) or real_load(self, patch))
    a = list(PatchBatches(cached, train_transforms(cfg), 2, seed=3, start_step=0, stop_step=6, patch_size=[16] * 3))
    b = list(PatchBatches(bounded, train_transforms(cfg), 2, seed=3, start_step=0, stop_step=6, patch_size=[16] * 3))
    assert loads and set(loads) <= set(ids[2:]), "only the uncached cases are read again"
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert all(isinstance(i, DeferredCase) for i in workflow._load_items(pre, catalog, ids, cache_gib=0.0))


def test_a_cascades_cases_over_the_cache_bound_are_predicted_once_not_at_every_draw(msd_dataset):
    """A case left on disk is read again at each draw (in a loader worker, where a GPU stage cannot run):
    the first stage predicts it once, when the cases are loaded, and the draws read its kept channels."""
    import pickle

    from imgx3d.config import load_config
    from imgx3d.data.transforms import DeferredCase
    from imgx3d.training import workflow

    predicted = []

    def stage(volume, grid):  # a stand-in first stage: a map that depends on the image, counted per call
        predicted.append(volume.path)
        image = image_to_model(volume.array, grid, cfg)
        return torch.stack([image[0] > 0, image[0] > 1]).float()

    cfg = load_config(None, ["data.patch_size=[16,16,16]"]).data
    catalog = find_cases(msd_dataset)
    pre = Preprocessor(cfg, stage)
    ids = [c.case_id for c in catalog.cases[:3]]
    cached = workflow._load_items(pre, catalog, ids)
    predicted.clear()
    bounded = workflow._load_items(pre, catalog, ids, cache_gib=0.0)
    assert all(isinstance(i, DeferredCase) for i in bounded) and len(predicted) == 3, "each case predicted once"
    for item, deferred in zip(cached, bounded, strict=True):
        for _ in range(3):  # drawn three times, in a worker: a pickled copy, which must not hold the stage
            drawn = pickle.loads(pickle.dumps(deferred)).load([16, 16, 16])
            assert torch.equal(drawn["image"], item["image"]) and torch.equal(drawn["label"], item["label"])
    assert len(predicted) == 3, "drawing a case again does not run the stage again"
