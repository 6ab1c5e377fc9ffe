"""Datasets: image folders, idx files, Fashion-MNIST, digits, arrays, wrappers (dinokit.data)."""

from __future__ import annotations

import gzip
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data import (
    DigitsDataset,
    FashionMNISTDataset,
    ImageFolderDataset,
    ImageReadError,
    TensorImageDataset,
    TransformDataset,
    datasets,
    fashion_mnist_available,
    load_demo_dataset,
    load_idx,
)

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_available(FMNIST),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


def save(path, colour=(200, 0, 0), mode="RGB", size=(6, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


# ---------------------------------------------------------------------------------- folders
def test_labelled_sub_folders_give_sorted_classes_and_targets(tmp_path):
    save(tmp_path / "dogs" / "a.png", (0, 0, 200))
    save(tmp_path / "cats" / "b.png", (200, 0, 0))
    save(tmp_path / "cats" / "deep" / "deeper" / "c.PNG", (200, 0, 0))  # recursion, any case
    save(tmp_path / "birds" / "d.JpG", (0, 200, 0))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, transform=lambda im: im.getpixel((0, 0)))
    assert ds.classes == ["birds", "cats", "dogs"]
    names = [p.name for p in ds.paths]
    assert names == ["d.JpG", "b.png", "c.PNG", "a.png"]  # sorted full paths
    assert ds.targets == [0, 1, 1, 2]
    pixel, label = ds[3]
    assert label == 2 and pixel == (0, 0, 200)
    assert ImageFolderDataset(tmp_path, labels="none").targets == [-1] * 4


def test_flat_and_mixed_folders_are_unlabelled(tmp_path):
    for i in range(3):
        save(tmp_path / "flat" / f"{i}.png")
    flat = ImageFolderDataset(tmp_path / "flat")
    assert flat.classes == [] and [flat[i][1] for i in range(3)] == [-1, -1, -1]
    save(tmp_path / "mixed" / "top.png")
    save(tmp_path / "mixed" / "sub" / "x.png")
    assert ImageFolderDataset(tmp_path / "mixed").targets == [-1, -1]


def test_grey_images_stay_grey_and_alpha_is_composited(tmp_path):
    save(tmp_path / "g.png", 70, mode="L")
    save(tmp_path / "t.png", (0, 0, 0, 0), mode="RGBA")
    ds = ImageFolderDataset(tmp_path)
    grey, clear = ds[0][0], ds[1][0]
    assert grey.mode == "L" and grey.getpixel((0, 0)) == 70
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    forced = ImageFolderDataset(tmp_path, mode="RGB")[0][0]
    assert forced.mode == "RGB" and forced.getpixel((0, 0)) == (70, 70, 70)


def test_custom_extensions_and_symlinked_folders(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.bmp")
    assert len(ImageFolderDataset(tmp_path, extensions=["BMP"])) == 1
    assert len(ImageFolderDataset(tmp_path)) == 2
    save(tmp_path / "elsewhere" / "c.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link").symlink_to(tmp_path / "elsewhere")  # followed, but only once
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)  # a cycle must not hang the scan
    names = sorted(p.name for p in ImageFolderDataset(tmp_path).paths)
    assert names == ["a.png", "b.bmp", "c.png"]


def _with_bad_files(tmp_path):
    for i in range(3):
        save(tmp_path / f"img{i}.png", (i * 80, 0, 0))
    good = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "img0_garbage.png").write_bytes(b"these are not the bytes of a png")
    (tmp_path / "img1_truncated.png").write_bytes(good[: len(good) // 2])
    # sorted paths: img0, img0_garbage, img1, img1_truncated, img2


def test_unreadable_files_are_skipped_with_a_warning_naming_them(tmp_path, monkeypatch):
    _with_bad_files(tmp_path)
    real = datasets.read_image
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 5
    with pytest.warns(UserWarning, match="img0_garbage.png"):
        img, _ = ds[1]
    assert img.getpixel((0, 0)) == (80, 0, 0)  # served the next index: img1
    with pytest.warns(UserWarning, match="img1_truncated.png"):
        img, _ = ds[3]
    assert img.getpixel((0, 0)) == (160, 0, 0)  # img2
    reads = []
    monkeypatch.setattr(datasets, "read_image", lambda path, mode=None, **kw: reads.append(path.name) or real(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are neither retried nor warned about again
        assert ds[1][0].getpixel((0, 0)) == (80, 0, 0)
    assert reads == ["img1.png"]
    assert sorted(s.rsplit("/", 1)[-1] for s in ds.skipped) == ["img0_garbage.png", "img1_truncated.png"]
    assert "2 unreadable" in ds.summary()


def test_strict_mode_raises_with_the_path(tmp_path):
    _with_bad_files(tmp_path)
    strict = ImageFolderDataset(tmp_path, strict=True)
    assert strict[0][0].getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ImageReadError, match="img0_garbage.png"):
        strict[1]
    with pytest.raises(ImageReadError, match="img1_truncated.png"):
        strict[3]


def test_verify_decodes_everything_up_front(tmp_path):
    _with_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(UserWarning):
        bad = ds.verify()
    assert sorted(b.rsplit("/", 1)[-1] for b in bad) == ["img0_garbage.png", "img1_truncated.png"]
    assert len(ds) == 3 and len(ds.targets) == 3 and "2 unreadable" in ds.summary()
    strict = ImageFolderDataset(tmp_path, strict=True)
    assert len(strict.verify()) == 2 and len(strict) == 5  # reported, kept: access will raise


def test_a_dataloader_worker_survives_a_bad_file(tmp_path):
    _with_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, transform=lambda im: torch.tensor(im.getpixel((0, 0))))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (x, y), = list(loader)
    assert x[:, 0].tolist() == [0, 80, 80, 160, 160] and y.tolist() == [-1] * 5


def test_missing_wrong_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory .* does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        ImageFolderDataset(tmp_path / "file.png")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found") as err:
        ImageFolderDataset(tmp_path / "empty")
    assert "'.png'" in str(err.value) and "'.jpg'" in str(err.value)  # what was searched
    with pytest.raises(ValueError, match="labels"):
        ImageFolderDataset(tmp_path, labels="yes")


# ---------------------------------------------------------------------------------- idx files
def _idx(type_byte: int, dims: tuple[int, ...], body: bytes) -> bytes:
    return bytes([0, 0, type_byte, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body


def test_idx_reader_gzip_and_raw(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    gz = tmp_path / "x-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(_idx(0x08, (2, 3, 4), data.tobytes())))
    raw = tmp_path / "x-idx3-ubyte"
    raw.write_bytes(_idx(0x08, (2, 3, 4), data.tobytes()))
    assert np.array_equal(load_idx(gz), data) and np.array_equal(load_idx(raw), data)
    shorts = tmp_path / "s.idx"  # big-endian int16: 0x0102 = 258, 0xFFFF = -1
    shorts.write_bytes(_idx(0x0B, (2,), b"\x01\x02\xff\xff"))
    assert load_idx(shorts).tolist() == [258, -1]


def test_idx_reader_rejects_corrupt_files(tmp_path):
    bad_magic = tmp_path / "magic.gz"
    bad_magic.write_bytes(gzip.compress(b"\x01\x02\x08\x01" + b"\x00" * 8))
    with pytest.raises(ValueError, match="magic"):
        load_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(_idx(0x08, (10,), b"\x00" * 7))
    with pytest.raises(ValueError, match=r"short.*7 data bytes.*10"):
        load_idx(short)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(_idx(0x08, (100,), bytes(100)))[:20])
    with pytest.raises(ValueError, match="broken.gz"):
        load_idx(broken_gz)


# ------------------------------------------------------------------------------ Fashion-MNIST
@needs_fmnist
def test_real_fashion_mnist_files():
    test = FashionMNISTDataset(FMNIST, split="test")
    assert len(test) == 10000 and np.bincount(test.targets).tolist() == [1000] * 10  # published
    img, label = test[0]
    assert img.mode == "L" and img.size == (28, 28)
    # the first five test images are ankle boot, pullover, trouser, trouser, shirt
    assert [test[i][1] for i in range(5)] == [9, 2, 1, 1, 6]
    assert test.classes[label] == "Ankle boot" and len(test.classes) == 10


@needs_fmnist
def test_fashion_mnist_limit_is_a_balanced_nested_subset():
    small = FashionMNISTDataset(FMNIST, split="test", limit=25)
    larger = FashionMNISTDataset(FMNIST, split="test", limit=100)
    counts = np.bincount(small.targets, minlength=10)
    assert len(small) == 25 and counts.max() - counts.min() <= 1
    assert np.bincount(larger.targets).tolist() == [10] * 10
    assert set(small.indices) <= set(larger.indices)
    assert list(small.indices) == sorted(small.indices)
    full = FashionMNISTDataset(FMNIST, split="test")
    assert all(full.targets[i] == y for i, y in zip(small.indices, small.targets))
    assert np.array_equal(np.asarray(small[3][0]), np.asarray(full[int(small.indices[3])][0]))


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*apt-get install dataset-fashion-mnist"):
        load_demo_dataset("fashion-mnist", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        FashionMNISTDataset(tmp_path, split="val")


def test_auto_falls_back_to_digits_with_the_install_command(tmp_path):
    with pytest.warns(UserWarning, match="apt-get install dataset-fashion-mnist"):
        ds = load_demo_dataset("auto", split="test", root=tmp_path, limit=10)
    assert isinstance(ds, DigitsDataset) and len(ds) == 10
    with pytest.raises(ValueError, match="name"):
        load_demo_dataset("cifar", root=tmp_path)


@needs_fmnist
def test_auto_picks_fashion_mnist_when_installed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_demo_dataset("auto", split="test", limit=20)
    assert isinstance(ds, FashionMNISTDataset) and len(ds) == 20


# ----------------------------------------------------------------------------------- digits
def test_digits_split_is_stratified_deterministic_and_disjoint():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(train) + len(test) == 1797 and len(test) == 450  # ceil(0.25 * 1797)
    assert not set(train.indices) & set(test.indices)
    per_class = np.bincount(raw.target)  # stratified: a quarter of every class is in test
    assert np.abs(np.bincount(test.targets) - 0.25 * per_class).max() <= 1
    assert np.array_equal(DigitsDataset("test").indices, test.indices)
    assert not np.array_equal(DigitsDataset("test", seed=1).indices, test.indices)
    img, label = test[0]
    k = int(test.indices[0])
    assert img.mode == "L" and img.size == (8, 8) and label == raw.target[k]
    expected = np.rint(raw.images[k] * 255 / 16).astype(np.uint8)  # 16 -> 255
    assert np.array_equal(np.asarray(img), expected)
    assert len(DigitsDataset("train", limit=30)) == 30


# ------------------------------------------------------------------------- arrays and wrappers
def test_tensor_image_dataset_accepts_numpy_and_torch():
    grey = TensorImageDataset(np.zeros((5, 8, 8), np.uint8), labels=[0, 1, 0, 1, 3])
    img, label = grey[4]
    assert img.shape == (1, 8, 8) and img.dtype == torch.uint8 and label == 3
    rgb = TensorImageDataset(torch.rand(2, 3, 4, 4), transform=lambda x: x.sum())
    value, label = rgb[1]
    assert value.shape == () and label == -1


def test_tensor_image_dataset_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\].*\(8, 8\)"):
        TensorImageDataset(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="channels-last"):
        TensorImageDataset(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="labels has 2 entries for 3 images"):
        TensorImageDataset(np.zeros((3, 8, 8), np.uint8), labels=[0, 1])
    with pytest.raises(TypeError, match="int64"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.int64))


def test_transform_dataset_wraps_images_and_tuples():
    def double(x):
        return 2 * x

    assert TransformDataset([1, 2], double)[1] == (4, -1)
    assert TransformDataset([(1, 7), (2, None)], double)[0] == (2, 7)
    assert TransformDataset([(1, 0)], double)[0] == (2, 0)  # label 0 is a label
    assert TransformDataset([(1, 7), (2, None)], double)[1] == (4, -1)
    assert TransformDataset([(3, torch.tensor(5), "extra")], double)[0] == (6, 5)
    assert len(TransformDataset([1, 2, 3], double)) == 3
    with pytest.raises(TypeError, match="transform"):
        TransformDataset([1], None)


# ---------------------------------------------------------------------------------- hostile files
def test_16_bit_palette_cmyk_and_rgba_images_are_converted(tmp_path):
    Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)).save(tmp_path / "a16.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "b_palette.png")
    pal.save(tmp_path / "c_palette_clear.png", transparency=1)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "d_cmyk.tif")
    Image.new("RGBA", (4, 4), (0, 0, 255, 128)).save(tmp_path / "e_rgba.png")
    ds = ImageFolderDataset(tmp_path)
    deep, palette, clear, cmyk, rgba = (ds[i][0] for i in range(5))
    assert deep.mode == "L" and deep.getpixel((0, 0)) == round(30000 / 257)  # 117, not saturated 255
    assert palette.mode == "RGB" and palette.getpixel((0, 0)) == (10, 200, 30)
    assert clear.getpixel((0, 0)) == (255, 255, 255)  # transparent palette entry: white
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0)) == (255, 0, 0)
    r, g, b = rgba.getpixel((0, 0))
    assert (r, g) == (127, 127) and b == 255  # half-transparent blue over white


def _bomb_png(path, side=50_000):
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [50_000, 17_000])  # > 2x the 250 Mpx limit (PIL's error) and 1-2x (warning)
def test_decompression_bomb_is_refused_by_name_even_in_lenient_mode(tmp_path, side):
    save(tmp_path / "a_good.png")
    _bomb_png(tmp_path / "b_bomb.png", side)
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(UserWarning, match="b_bomb.png.*decompression bomb"):
        assert ds[1][0].size == (6, 6)  # the next readable image is served
    with pytest.raises(ImageReadError, match="b_bomb.png.*decompression bomb"):
        ImageFolderDataset(tmp_path, strict=True)[1]


def test_unreadable_folder_is_reported_and_skipped(tmp_path, monkeypatch):
    import os

    save(tmp_path / "ok" / "a.png")
    save(tmp_path / "secret" / "b.png")
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("secret"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match="cannot list folder .*secret.*Permission denied"):
        ds = ImageFolderDataset(tmp_path)
    assert [p.name for p in ds.paths] == ["a.png"]
    with pytest.raises(ImageReadError, match="secret"):
        ImageFolderDataset(tmp_path, strict=True)


def test_folder_with_no_readable_image_fails_at_construction_with_a_count(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(ImageReadError, match="none of the 3 image file"):
        ImageFolderDataset(tmp_path)


def test_skipped_files_are_counted_across_loader_workers(tmp_path):
    for i in range(6):
        save(tmp_path / f"{i}_good.png")
    (tmp_path / "3_bad.png").write_bytes(b"nope")
    (tmp_path / "5_bad.png").write_bytes(b"nope")
    ds = ImageFolderDataset(tmp_path, transform=lambda im: torch.zeros(1))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum(len(b[0]) for b in loader) == 8
    assert sorted(s.rsplit("/", 1)[-1] for s in ds.skipped) == ["3_bad.png", "5_bad.png"]
