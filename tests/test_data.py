"""Multi-crop augmentation, datasets, collate and masks."""

from __future__ import annotations

import gzip
import random
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data import (
    DigitsDataset,
    EvalTransform,
    FashionMNISTDataset,
    ImageFolderDataset,
    ImageReadError,
    MultiCropCollate,
    MultiCropConfig,
    MultiCropTransform,
    TensorImageDataset,
    load_idx,
)
from dinokit.data.datasets import fashion_mnist_available
from dinokit.masking import BlockMaskGenerator, make_mask_generator, random_mask


def test_counts_and_sizes_default_small_and_no_locals():
    img = Image.new("RGB", (300, 240), (200, 30, 30))
    v = MultiCropTransform()(img)
    assert [t.shape for t in v["global_views"]] == [(3, 224, 224)] * 2
    assert [t.shape for t in v["local_views"]] == [(3, 96, 96)] * 8
    small = MultiCropTransform(MultiCropConfig.small(28, channels=1, n_local=3))(Image.new("L", (28, 28)))
    assert [t.shape for t in small["global_views"]] == [(1, 28, 28)] * 2
    assert [t.shape for t in small["local_views"]] == [(1, 16, 16)] * 3
    none = MultiCropTransform(MultiCropConfig(n_local=0))(img)
    assert none["local_views"] == [] and len(none["global_views"]) == 2


@pytest.mark.parametrize("img", [
    Image.new("RGB", (64, 64), (10, 200, 30)), Image.new("L", (64, 64), 128),
    Image.new("RGBA", (64, 64), (10, 200, 30, 100)), Image.new("P", (64, 64)),
    torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), torch.rand(1, 64, 64),
    torch.rand(64, 64), torch.rand(4, 64, 64),
])
def test_every_input_kind_gives_the_configured_channels(img):
    for channels in (1, 3):
        cfg = MultiCropConfig(global_size=32, local_size=16, n_local=1, channels=channels)
        v = MultiCropTransform(cfg)(img)
        assert v["global_views"][0].shape == (channels, 32, 32) and torch.isfinite(v["local_views"][0]).all()


def _only(**p) -> MultiCropConfig:
    """Every random step off except those named, on 8-px crops of an 8-px image."""
    base = dict(global_size=8, local_size=8, n_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
                flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0,
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    base.update(p)
    return MultiCropConfig(**base)


def test_solarisation_only_on_the_second_global_crop_with_its_probability():
    torch.manual_seed(0)
    t = MultiCropTransform(_only(solarize_p=0.2))
    img = torch.full((3, 8, 8), 0.9)  # solarised pixels become 0.1
    hits = torch.zeros(4)
    for _ in range(400):
        v = t(img)
        crops = v["global_views"] + v["local_views"]
        hits += torch.tensor([float(c.mean() < 0.5) for c in crops])
    assert hits[0] == 0 and hits[2] == 0 and hits[3] == 0
    assert 0.14 < hits[1] / 400 < 0.26


def test_blur_probabilities_per_crop():
    torch.manual_seed(0)
    t = MultiCropTransform(_only(blur_p=(1.0, 0.1, 0.5), blur_kernel=3, blur_sigma=(1.0, 2.0)))
    img = torch.zeros(3, 8, 8)
    img[:, ::2, ::2] = 1.0  # a checkerboard: blur lowers its contrast
    rates = torch.zeros(4)
    for _ in range(300):
        v = t(img)
        crops = v["global_views"] + v["local_views"]
        rates += torch.tensor([float(c.max() < 0.999) for c in crops])
    rates /= 300
    assert rates[0] == 1.0 and 0.04 < rates[1] < 0.17 and 0.4 < rates[2] < 0.6 and 0.4 < rates[3] < 0.6


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropConfig(global_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="solarize_p"):
        MultiCropConfig(solarize_p=2)
    with pytest.raises(ValueError, match="n_local"):
        MultiCropConfig(n_local=-1)
    assert MultiCropConfig.from_dict(MultiCropConfig.small(32).to_dict()) == MultiCropConfig.small(32)


def test_eval_transform_is_deterministic():
    t = EvalTransform.for_config(MultiCropConfig())
    img = Image.new("RGB", (300, 200), (1, 2, 3))
    assert t(img).shape == (3, 224, 224) and torch.equal(t(img), t(img))


def _folder(tmp_path, labelled=True):
    for c, colour in (("cats", (200, 0, 0)), ("dogs", (0, 0, 200))):
        d = tmp_path / c if labelled else tmp_path
        (d / "deep").mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (16, 16), colour).save(d / ("deep" if i == 2 else ".") / f"{c}{i}.png")
    return tmp_path


def test_image_folder_labels_recursion_and_unlabelled(tmp_path):
    ds = ImageFolderDataset(_folder(tmp_path / "a"))
    assert len(ds) == 6 and ds.classes == ["cats", "dogs"] and sorted(set(ds.targets)) == [0, 1]
    flat = ImageFolderDataset(_folder(tmp_path / "b", labelled=False))
    assert flat.classes == [] and {y for _, y in (flat[i] for i in range(len(flat)))} == {-1}
    assert ImageFolderDataset(tmp_path / "a", labels="none").targets == [-1] * 6


def test_unreadable_images_are_skipped_with_a_warning_or_fail_in_strict_mode(tmp_path):
    root = _folder(tmp_path)
    (root / "cats" / "broken.png").write_bytes(b"not an image")
    good = root / "cats" / "cats0.png"
    (root / "cats" / "truncated.png").write_bytes(good.read_bytes()[:40])
    with pytest.warns(UserWarning, match="broken.png"):  # the first file is probed at once
        ds = ImageFolderDataset(root)
    with pytest.warns(UserWarning, match="truncated.png"):
        items = [ds[i] for i in range(len(ds))]
    assert all(isinstance(img, Image.Image) for img, _ in items)
    assert len(ds.skipped) == 2 and "2 unreadable" in ds.summary()
    with pytest.raises(ImageReadError, match="broken.png"):
        strict = ImageFolderDataset(root, strict=True)
        [strict[i] for i in range(len(strict))]
    with pytest.warns(UserWarning):
        checked = ImageFolderDataset(root)
        assert len(checked.verify()) == 2
    assert len(checked) == 6


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty")


def test_idx_reader(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + data.tobytes())
    assert np.array_equal(load_idx(path), data)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        load_idx(bad)


@pytest.mark.skipif(not fashion_mnist_available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = FashionMNISTDataset(split="test", limit=50)
    img, y = ds[0]
    assert len(ds) == 50 and img.size == (28, 28) and img.mode == "L" and 0 <= y < 10
    assert ds.classes[9] == "Ankle boot"


def test_digits_and_tensor_datasets():
    tr, te = DigitsDataset("train"), DigitsDataset("test")
    assert len(tr) + len(te) == 1797 and tr[0][0].size == (8, 8)
    t = TensorImageDataset(np.zeros((5, 8, 8), np.uint8), labels=[0, 1, 0, 1, 0])
    assert t[1][0].shape == (1, 8, 8) and t[1][1] == 1
    with pytest.raises(ValueError, match="N, C, H, W"):
        TensorImageDataset(np.zeros((8, 8)))


def _items(n=3, n_local=2):
    t = MultiCropTransform(MultiCropConfig(global_size=32, local_size=16, n_local=n_local))
    return [(t(Image.new("RGB", (40, 40), (i * 50, 0, 0))), i) for i in range(n)]


def test_collate_shapes_and_errors():
    b = MultiCropCollate()(_items())
    assert [v.shape for v in b["global_views"]] == [(3, 3, 32, 32)] * 2
    assert [v.shape for v in b["local_views"]] == [(3, 3, 16, 16)] * 2
    assert b["labels"].tolist() == [0, 1, 2] and b["masks"] is None
    bad = _items(2) + _items(1, n_local=1)
    with pytest.raises(ValueError, match="item 2 has 1 local_views"):
        MultiCropCollate()(bad)


def test_collate_masks_follow_the_ratio_range():
    gen = make_mask_generator("block", (8, 8))  # 32-px crops, 4-px patches: 64 patches
    collate = MultiCropCollate(gen, patch_size=4, mask_probability=0.5, mask_ratio_range=(0.1, 0.5))
    torch.manual_seed(0)
    masks = torch.cat([collate(_items(8, n_local=0))["masks"] for _ in range(10)])
    assert masks.shape == (160, 64)
    ratios = masks.float().mean(1)
    assert (ratios == 0).float().mean() == pytest.approx(0.5)
    assert ratios.max() <= 0.5 + 1e-6 and ratios[ratios > 0].min() >= 4 / 64
    # crop i of the masked ones draws its ratio in the i-th slice of [0.1, 0.5]: spread, not constant
    assert ratios[ratios > 0].std() > 0.05


def test_block_masks_respect_the_target_and_block_size():
    gen = BlockMaskGenerator((14, 14))
    rng = random.Random(0)
    for target in (10, 40, 80):
        m = gen(target, rng)
        assert 4 <= int(m.sum()) <= target
    # As the official generator, once fewer than min_num_patches remain it still places smaller
    # blocks, so small targets are usually met exactly (pinned against the official one in
    # tests/test_parity_official.py).
    hits = sum(int(gen(6, random.Random(s)).sum()) == 6 for s in range(50))
    assert hits >= 35


def test_random_mask_exact_counts():
    m = random_mask(5, 20, 0.3, torch.Generator().manual_seed(0))
    assert m.shape == (5, 20) and m.sum(1).tolist() == [6] * 5
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(1, 4, 1.5)
