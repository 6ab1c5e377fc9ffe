"""The dense task (``dinokit.data.scenes``): labels against the construction written here,
per-class counts, background, determinism, the held-out split and the dataset names."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dinokit.config import load_config
from dinokit.data.scenes import BACKGROUND, SINGLE_ITEM, SceneDataset, SceneLayout, scene_dataset
from dinokit.train.build import build_dataset

#: Four 8x8 items, item k of class k: item 0 fully inked (200), item 1 only its left half, item 2 a
#: single-pixel frame, item 3 faint everywhere (below the ink threshold: never pasted).
ITEMS = np.zeros((4, 8, 8), dtype=np.uint8)
ITEMS[0] = 200
ITEMS[1, :, :4] = 150
ITEMS[2, 0, :] = ITEMS[2, -1, :] = ITEMS[2, :, 0] = ITEMS[2, :, -1] = 255
ITEMS[3] = 10
LABELS = np.arange(4)


def _reference(ds: SceneDataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The scene painted again from its placements: each item resized to its side (bilinear), its
    ink (>= the threshold) copied onto the canvas over what lies below, labelled class + 1."""
    from PIL import Image

    n = ds.layout.canvas
    image, mask = np.zeros((n, n), np.uint8), np.zeros((n, n), np.uint8)
    for p in ds.placements(index):
        item = np.asarray(Image.fromarray(ITEMS[p.item]).resize((p.side, p.side), Image.Resampling.BILINEAR))
        for y in range(p.side):
            for x in range(p.side):
                if item[y, x] >= ds.layout.ink:
                    image[p.top + y, p.left + x] = item[y, x]
                    mask[p.top + y, p.left + x] = p.label + 1
    return image, mask


def test_scene_labels_follow_their_construction():
    ds = SceneDataset("train", 20, items=(ITEMS, LABELS), layout=SceneLayout(canvas=24, items=(2, 3),
                                                                                scale=(0.3, 0.6)))
    for i in range(len(ds)):
        image, mask = ds.scene(i)
        ref_image, ref_mask = _reference(ds, i)
        np.testing.assert_array_equal(mask, ref_mask)
        np.testing.assert_array_equal(image, ref_image)
        assert ((mask == BACKGROUND) == (image == 0)).all()  # ink and labels coincide
        assert 4 not in mask  # the faint item 3 never shows
        _, m = ds[i]
        assert m.dtype == torch.long and torch.equal(m, torch.from_numpy(ref_mask.astype(np.int64)))


def test_a_lone_fully_inked_item_covers_its_square_exactly():
    """One fully inked item per scene: its class + 1 on side x side pixels, background elsewhere,
    and the classification target is its class."""
    layout = SceneLayout(canvas=20, items=(1, 1), scale=(0.25, 0.8))
    ds = SceneDataset("test", 30, items=(ITEMS[:1], LABELS[:1]), layout=layout)
    cls = SceneDataset("test", 30, items=(ITEMS[:1], LABELS[:1]), layout=layout, target="class")
    sides = set()
    for i in range(len(ds)):
        (p,) = ds.placements(i)
        _, mask = ds.scene(i)
        counts = np.bincount(mask.ravel(), minlength=2)
        assert counts[1] == p.side**2 and counts[0] == 20 * 20 - p.side**2
        assert (mask[p.top : p.top + p.side, p.left : p.left + p.side] == 1).all()
        assert cls[i][1] == 0
        sides.add(p.side)
    assert len(sides) > 3  # random scale


def test_scenes_are_deterministic_by_seed_and_index():
    a = SceneDataset("train", 10, items=(ITEMS, LABELS))
    b = SceneDataset("train", 50, items=(ITEMS, LABELS))
    for i in range(10):  # scene i does not depend on how many scenes are asked for
        np.testing.assert_array_equal(a.scene(i)[1], b.scene(i)[1])
    other_seed = SceneDataset("train", 10, items=(ITEMS, LABELS), seed=1)
    other_split = SceneDataset("test", 10, items=(ITEMS, LABELS))
    assert any(not np.array_equal(a.scene(i)[1], other_seed.scene(i)[1]) for i in range(10))
    assert any(not np.array_equal(a.scene(i)[1], other_split.scene(i)[1]) for i in range(10))


def test_the_built_in_scenes_hold_every_class_and_the_test_split_is_held_out():
    """On the real items (Fashion-MNIST, else digits): background and all ten classes occur, ink
    and labels coincide, and the test scenes are made of the test items only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = scene_dataset("scenes", "train", limit=200, target="mask")
        test = scene_dataset("scenes", "test", limit=50, target="mask")
        items = scene_dataset("scene-items", "train", limit=50)
    counts = np.zeros(11, dtype=np.int64)
    for i in range(len(train)):
        image, mask = train.scene(i)
        assert ((mask == BACKGROUND) == (image < train.layout.ink)).all()
        counts += np.bincount(mask.ravel(), minlength=11)
    assert (counts > 0).all() and counts[0] > counts[1:].max()
    assert train.classes[0] == "background" and len(train.classes) == 11
    assert not np.shares_memory(train.item_images, test.item_images)
    assert len(test.item_images) < len(train.item_images)  # the test split's own (smaller) item set
    assert items.layout == SINGLE_ITEM and all(len(items.placements(i)) == 1 for i in range(10))
    assert isinstance(items[0][1], int) and train[0][1].shape == (56, 56)


@pytest.mark.parametrize("name, labelled", [("scenes", False), ("scene-items", True)])
def test_the_scene_sets_are_dataset_names_of_the_config(name, labelled):
    cfg = load_config("demo", [f"data.dataset={name}", "data.limit=12", "data.val_limit=5"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 12 and len(val) == 5 and val.split == "test"
    label = train[3][1]
    assert (label >= 0) == labelled and train[3][0].size == (56, 56)
