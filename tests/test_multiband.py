"""Multi-band images (GeoTIFF/TIFF via tifffile, .npy): per-band statistics against numpy (streaming,
masks, sharded over processes), augmentations that do not assume RGB, RGB weights adapted to C
bands, and a 4-band and a 13-band uint16 TIFF folder through train, resume, k-NN, embed, export
and pictures; bad inputs are one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dinokit.cli import main
from dinokit.data.multicrop import EvalTransform, MultiCropConfig, MultiCropTransform, to_image_tensor

tifffile = pytest.importorskip("tifffile")

SIZE = 16


def _images(n: int, bands: int, seed: int) -> list[np.ndarray]:
    """uint16 [bands, 16, 16] images of two kinds: bright in the even bands, or in the odd ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = np.where(np.arange(bands) % 2 == i % 2, 40000, 8000).astype(np.float64)
        img = base[:, None, None] + rng.normal(0, 3000, (bands, SIZE, SIZE))
        out.append(np.clip(img, 0, 65535).astype(np.uint16))
    return out


def _write_folder(root, bands: int, n: int = 16, seed: int = 0, layout: str = "planar") -> list[np.ndarray]:
    """``root/{a,b}/img_k.tif`` (class = kind of image); planar (CYX, one page per band) or
    interleaved (YXS) TIFFs."""
    imgs = _images(n, bands, seed)
    for i, img in enumerate(imgs):
        d = root / ("a" if i % 2 == 0 else "b")
        d.mkdir(parents=True, exist_ok=True)
        if layout == "planar":
            tifffile.imwrite(d / f"img_{i:02d}.tif", img, photometric="minisblack", planarconfig="separate")
        else:
            tifffile.imwrite(d / f"img_{i:02d}.tif", np.moveaxis(img, 0, -1), photometric="minisblack",
                             planarconfig="contig")
    return imgs


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bands")
    out = {}
    for bands in (4, 13):
        out[bands] = (root / f"b{bands}", _write_folder(root / f"b{bands}", bands, seed=bands,
                                                        layout="planar" if bands == 4 else "interleaved"))
    return out


# ---------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("bands", [4, 13])
def test_stats_match_numpy(folders, bands, tmp_path, capsys):
    from dinokit.data.multiband import band_statistics

    root, imgs = folders[bands]
    stack = np.stack(imgs).astype(np.float64) / 65535  # [N, C, H, W]
    want_mean, want_std = stack.mean(axis=(0, 2, 3)), stack.std(axis=(0, 2, 3))
    stats = band_statistics(root)
    assert stats.images == len(imgs) and stats.pixels == len(imgs) * SIZE * SIZE
    np.testing.assert_allclose(stats.mean, want_mean, rtol=1e-9)
    np.testing.assert_allclose(stats.std, want_std, rtol=1e-7)
    assert main(["data", "stats", str(root), "--no-progress", "--output", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert f"{len(imgs)} images, {bands} bands" in out and "data.mean=[" in out
    np.testing.assert_allclose(json.loads((tmp_path / "s.json").read_text())["mean"], want_mean, rtol=1e-9)


def test_masks_leave_pixels_out_and_npy_files_read_the_same(tmp_path):
    from dinokit.data.multiband import band_statistics, load_image

    imgs = _images(3, 5, seed=1)
    for i, img in enumerate(imgs):
        np.save(tmp_path / f"x{i}.npy", img)
    valid = np.ones((SIZE, SIZE), np.uint8)
    valid[:, :4] = 0  # no data in the first four columns of x0
    np.save(tmp_path / "x0.mask.npy", valid)
    stack = np.concatenate([imgs[0][:, :, 4:].reshape(5, -1), imgs[1].reshape(5, -1), imgs[2].reshape(5, -1)],
                           axis=1) / 65535
    stats = band_statistics(tmp_path)
    assert stats.images == 3 and stats.pixels == stack.shape[1]
    np.testing.assert_allclose(stats.mean, stack.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats.std, stack.std(axis=1), rtol=1e-7)
    x = load_image(tmp_path / "x0.npy").numpy()  # invalid pixels: the image's mean over its valid ones
    np.testing.assert_allclose(x[:, :, :4], np.broadcast_to(stack[:, : SIZE * 12].mean(axis=1)[:, None, None],
                                                              (5, SIZE, 4)), rtol=1e-5)


def test_stats_sharded_over_processes_add_up_to_one_process(folders, monkeypatch):
    # Two processes of one torch.distributed world: each reads every second file and the sums are
    # all-reduced. Here the all-reduce adds the other rank's sums, computed the same way.
    import torch.distributed as dist

    from dinokit.data import multiband

    root, _ = folders[4]
    one = multiband.band_statistics(root)
    shares: dict[int, torch.Tensor] = {}
    rank = {"now": 0}

    def all_reduce(t):
        shares[rank["now"]] = t.clone()
        if len(shares) == 2:
            t += shares[1 - rank["now"]]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: rank["now"])
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    multiband.band_statistics(root)  # rank 0: its own share only (rank 1's not yet known here)
    rank["now"] = 1
    both = multiband.band_statistics(root)  # rank 1: its share + rank 0's
    assert shares[0][0, 0] == shares[1][0, 0] == one.pixels / 2  # half the files each
    np.testing.assert_allclose(both.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(both.std, one.std, rtol=1e-9)
    assert both.pixels == one.pixels


# -------------------------------------------------------------------------------- augmentations
def test_rgb_only_augmentations_are_refused_by_name_and_replaced_for_bands():
    with pytest.raises(ValueError) as e:
        MultiCropConfig(channels=13, mean=(0.0,), std=(1.0,))
    for name in ("jitter saturation", "jitter hue", "grayscale_p", "solarize_p"):
        assert name in str(e.value)
    cfg = MultiCropConfig.for_bands(13, global_size=16, local_size=8, n_local=2)
    assert cfg.grayscale_p == cfg.solarize_p == 0 and cfg.jitter == (0.4, 0.4, 0.0, 0.0)
    x = torch.rand(13, 24, 24) * 3 - 1  # bands outside [0, 1] are kept, never clamped
    views = MultiCropTransform(cfg)(x)
    assert [v.shape for v in views["global_views"]] == [(13, 16, 16)] * 2
    assert min(float(v.min()) for v in views["global_views"]) < 0 or max(float(v.max()) for v in views["global_views"]) > 1
    ev = EvalTransform(8, 8, [0.0], [1.0], channels=13)(x)
    assert ev.shape == (13, 8, 8) and float(ev.min()) < 0
    with pytest.raises(ValueError, match=r"\[13, H, W\]"):
        to_image_tensor(torch.rand(4, 8, 8), 13)


def test_band_jitter_changes_each_band_on_its_own():
    from dinokit.data.multicrop import BandJitter

    torch.manual_seed(0)
    x = torch.rand(6, 8, 8) + 1
    y = BandJitter(0.4, 0.0)(x)
    ratios = (y / x).flatten(1)
    assert torch.allclose(ratios, ratios[:, :1].expand_as(ratios))  # one factor per band
    assert ratios[:, 0].unique().numel() == 6  # ... that differs between bands


def test_rgb_weights_are_adapted_to_the_bands(tmp_path):
    import timm

    import dinokit
    from dinokit.config import load_config
    from dinokit.train.build import build_method

    kw = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    rgb = dinokit.build_backbone("vit_tiny_patch16_224", encoder_kwargs=kw)
    path = dinokit.export_backbone(rgb, tmp_path / "rgb")
    cfg = load_config("demo", ["data.dataset=multiband", f"data.path={tmp_path}", "data.channels=4",
                               "data.mean=[0.5]", "data.std=[0.2]", f"model.init_weights={path}",
                               "backbone.kwargs={img_size: 16, patch_size: 4, depth: 1, embed_dim: 32, "
                               "num_heads: 2, in_chans: 4}", "crops.global_size=16", "crops.local_size=8"])
    method = build_method(cfg)
    w = rgb.model.patch_embed.proj.weight.detach()
    want = timm.models.adapt_input_conv(4, w)
    torch.testing.assert_close(method.student_backbone.model.patch_embed.proj.weight, want)
    torch.testing.assert_close(method.student_backbone.model.blocks[0].attn.qkv.weight,
                               rgb.model.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------ the whole path
VIT = "{img_size: 16, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: %d}"


def _train(root, bands, out, *extra):
    return main(["train", "--config", "demo", "data.dataset=multiband", f"data.path={root}",
                 f"data.channels={bands}", f"backbone.kwargs={VIT % bands}", "crops.global_size=16",
                 "crops.local_size=8", "crops.n_local=2", "data.batch_size=8", "data.num_workers=0",
                 "dino.n_prototypes=32", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
                 "trainer.progress=false", "trainer.log_every_n_steps=1", f"trainer.output_dir={out}",
                 "trainer.run_name=r", *extra])


@pytest.mark.parametrize("bands", [4, 13])
def test_train_resume_knn_embed_export_and_pictures(folders, bands, tmp_path, capsys):
    from dinokit.data.multiband import band_statistics

    root, imgs = folders[bands]
    assert _train(root, bands, tmp_path, "trainer.epochs=1") == 0
    run = tmp_path / "r"
    stats = band_statistics(root)
    recorded = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())["data"]))
    np.testing.assert_allclose(recorded["mean"], stats.mean, rtol=1e-6)  # the run records the statistics
    assert _train(root, bands, tmp_path, "trainer.epochs=2", "trainer.resume=last") == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # 2 epochs x 16 images / 8
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(run), "--train-data", str(root), "--val-data", str(root)]) == 0
    assert "k-NN (cls features" in capsys.readouterr().out  # over the two kinds of images (labels a, b)
    assert main(["embed", "--checkpoint", str(run), "--data", str(root), "--output", str(tmp_path / "e"),
                 "--no-progress", "--device", "cpu"]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (len(imgs), 32) and np.isfinite(emb).all()
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "x"), "--format", "file"]) == 0
    meta = json.loads((tmp_path / "x.json").read_text())
    assert meta["preprocessing"]["channels"] == bands and len(meta["preprocessing"]["mean"]) == bands
    assert main(["embed", "--checkpoint", str(tmp_path / "x.safetensors"), "--data", str(root),
                 "--output", str(tmp_path / "e2"), "--no-progress", "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e2.npy"), emb, atol=1e-5)
    assert main(["viz", "pca", "--checkpoint", str(run), "--images", str(root), "--n", "2",
                 "--output", str(tmp_path / "viz")]) == 0
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "viz" / "pca.png").convert("RGB"), dtype=float).std() > 1.0
    if bands == 4:  # the interoperability formats take bands too
        pytest.importorskip("onnxruntime")
        assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "o"), "--format", "onnx"]) == 0
        assert main(["embed", "--checkpoint", str(tmp_path / "o.onnx"), "--data", str(root),
                     "--output", str(tmp_path / "e3"), "--no-progress"]) == 0
        np.testing.assert_allclose(np.load(tmp_path / "e3.npy"), emb, atol=1e-4)


# ---------------------------------------------------------------------------------- bad inputs
def _one_line_exit_2(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_inconsistent_band_counts_are_one_line_exit_2(tmp_path, capsys):
    root = tmp_path / "mixed"
    _write_folder(root, 4, n=4)
    tifffile.imwrite(root / "a" / "odd.tif", _images(1, 5, 0)[0], photometric="minisblack",
                     planarconfig="separate")
    _one_line_exit_2(capsys, _train(root, 4, tmp_path, "trainer.epochs=1"), "odd.tif has 5 band(s)")
    _one_line_exit_2(capsys, main(["data", "stats", str(root), "--no-progress"]), "odd.tif has 5 band(s)",
                     "img_00.tif has 4")


def test_mask_of_another_size_is_one_line_exit_2(tmp_path, capsys):
    _write_folder(tmp_path / "m", 4, n=2)
    tifffile.imwrite(tmp_path / "m" / "a" / "img_00.mask.tif", np.ones((8, 8), np.uint8))
    _one_line_exit_2(capsys, main(["data", "stats", str(tmp_path / "m"), "--no-progress"]),
                     "img_00.mask.tif is 1 x 8 x 8", "is 16 x 16")


def test_config_mismatches_are_one_line_exit_2(folders, tmp_path, capsys):
    root, _ = folders[4]
    code = main(["train", "--config", "demo", "data.dataset=multiband", f"data.path={root}", "data.channels=4"])
    _one_line_exit_2(capsys, code, "backbone.kwargs.in_chans", "data.channels is 4")
    code = _train(root, 4, tmp_path, "data.augment_on=device")
    _one_line_exit_2(capsys, code, "data.augment_on")
    code = _train(root, 13, tmp_path)  # the folder has 4 bands
    _one_line_exit_2(capsys, code, "has 4 band(s) but data.channels is 13")


def test_missing_geo_extra_is_one_line_exit_2(folders, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tifffile", None)  # as if the extra were not installed
    root, _ = folders[4]
    _one_line_exit_2(capsys, main(["data", "stats", str(root), "--no-progress"]), 'pip install "dinokit[geo]"')
