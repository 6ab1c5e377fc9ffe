"""k-NN (DINO's weighted vote), feature extraction and the pictures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vit
from dinokit.backbones import build_backbone
from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_classify, knn_evaluate
from dinokit.viz.attention import cls_attention_maps, plot_attention, threshold_attention
from dinokit.viz.curves import plot_training_curves, read_metrics
from dinokit.viz.embedding import plot_embedding_2d
from dinokit.viz.pca import pca_patch_maps, plot_pca


def test_knn_weighted_vote_by_hand():
    # train points at angles 0, 10, 20 (class 0) and 90 degrees (class 1); query at 60 degrees.
    ang = torch.tensor([0.0, 10.0, 20.0, 90.0]) * math.pi / 180
    train = torch.stack([ang.cos(), ang.sin()], 1) * 3.0  # scale must not matter
    labels = torch.tensor([0, 0, 0, 1])
    q = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    scores = knn_classify(train, labels, q, ks=(3,), temperature=0.07)[3]
    cos = [math.cos(math.radians(d)) for d in (30, 40, 50)]  # the 3 nearest: 90, 20, 10 degrees
    want0 = math.exp(cos[1] / 0.07) + math.exp(cos[2] / 0.07)
    want1 = math.exp(cos[0] / 0.07)
    torch.testing.assert_close(scores, torch.tensor([[want0, want1]]), rtol=1e-5, atol=0)


def test_chunked_equals_unchunked_and_all_ks_in_one_pass():
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(50, 8, generator=g), torch.randn(13, 8, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    full = knn_classify(tr, y, te, ks=(1, 5, 20))
    for chunk in (1, 3):
        part = knn_classify(tr, y, te, ks=(1, 5, 20), chunk_size=chunk)
        for k in full:  # chunked matmuls may differ in the last float bits
            torch.testing.assert_close(part[k], full[k], rtol=1e-5, atol=0)
    torch.testing.assert_close(knn_classify(tr, y, te, ks=(5,))[5], full[5], rtol=1e-5, atol=0)
    res = knn_evaluate(tr, y, te, torch.zeros(13, dtype=torch.long), ks=(5,))
    assert 0 <= res[5]["top1"] <= 100 and res[5]["top5"] is None  # 3 classes: no top-5


def test_knn_errors():
    with pytest.raises(ValueError, match="needs labelled data"):
        knn_classify(torch.randn(4, 2), torch.full((4,), -1), torch.randn(1, 2))
    with pytest.raises(ValueError, match="D=2 but test features D=3"):
        knn_classify(torch.randn(4, 2), torch.zeros(4), torch.randn(1, 3))


def test_feature_kinds():
    vit = tiny_vit()
    loader = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])),
              (torch.randn(1, 3, 32, 32), torch.tensor([1]))]
    for kind, dim in (("cls", 48), ("avgpool", 48), ("cls+avgpool", 96), ("last_blocks", 96)):
        f, y = extract_features(vit, loader, kind=kind, n_last_blocks=2, progress=False)
        assert f.shape == (3, dim) and y.tolist() == [0, 1, 1]
    f, y = extract_features(build_backbone("torchvision/resnet18"), [torch.randn(2, 3, 32, 32)],
                            progress=False)
    assert f.shape == (2, 512) and y is None
    with pytest.raises(TypeError, match="no patch tokens"):
        extract_features(build_backbone("torchvision/resnet18"), [torch.randn(1, 3, 32, 32)],
                         kind="avgpool", progress=False)


def test_attention_maps_sum_to_one_without_registers():
    vit = tiny_vit(num_registers=2)
    maps = cls_attention_maps(vit, torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 2, 4, 4)
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2, 2))
    with pytest.raises(TypeError, match="PCA"):
        cls_attention_maps(build_backbone("resnet18"), torch.randn(1, 3, 32, 32))


def test_threshold_keeps_the_smallest_set_holding_the_mass():
    m = torch.tensor([[0.5, 0.2], [0.2, 0.1]])
    keep = threshold_attention(m, 0.6)
    assert keep.tolist() == [[True, True], [False, False]] or keep.tolist() == [[True, False], [True, False]]
    assert m[keep].sum() >= 0.6 and m[keep].sum() - m[keep].min() < 0.6
    assert threshold_attention(m, 1.0).all()


def _png_ok(path):
    a = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    return path.stat().st_size > 0 and a.std() > 1.0


def test_pictures_are_written_and_not_blank(tmp_path):
    vit = tiny_vit()
    x = torch.rand(3, 3, 32, 32)
    maps = cls_attention_maps(vit, x)
    assert _png_ok(plot_attention(x[0], maps[0], tmp_path / "att.png", threshold=0.6))
    pca = pca_patch_maps(vit(x).patches.detach(), (4, 4))
    assert pca.rgb.shape == (3, 4, 4, 3) and pca.rgb.min() >= 0 and pca.rgb.max() <= 1
    assert pca.foreground.shape == (3, 4, 4)
    assert _png_ok(plot_pca(x, pca, tmp_path / "pca.png"))
    f = torch.cat([torch.randn(20, 5), torch.randn(20, 5) + 4])
    y = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    assert _png_ok(plot_embedding_2d(f, y, tmp_path / "tsne.png", class_names=["a", "b"]))
    csv = tmp_path / "logs" / "metrics.csv"
    csv.parent.mkdir()
    csv.write_text("epoch,step,train/loss,train/lr,train/teacher_entropy\n0,0,5.0,0.1,4.0\n"
                   "0,10,4.0,,3.0\n0,20,3.0,0.05,2.5\n")
    assert read_metrics(tmp_path)["train/lr"] == [(0, 0.1), (20, 0.05)]
    assert _png_ok(plot_training_curves(tmp_path, tmp_path / "curves.png", n_prototypes=64))
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        plot_training_curves(tmp_path / "logs" / "x", tmp_path / "c.png")


def test_pca_foreground_is_the_object_not_the_border():
    # 4 images on an 8x8 grid: a centred 6x6 object covering MORE than half the cells (as in
    # Fashion-MNIST), so "the minority is the foreground" would pick the background
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 8, 8, 8, generator=g) * 0.05
    feats[:, 1:7, 1:7, 0] += 3.0
    feats[:, 1:7, 1:7, 1] += torch.linspace(-1, 1, 6)  # some structure inside the object
    maps = pca_patch_maps(feats.reshape(4, 64, 8), (8, 8))
    assert maps.foreground[:, 1:7, 1:7].all() and not maps.foreground[:, 0].any()
