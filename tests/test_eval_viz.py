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


# ------------------------------------------------------------------ evaluation across processes
class _Counting(torch.utils.data.Dataset):
    """7 labelled images (an odd count: the shares differ); records which indices were read."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.rand(7, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0])
        self.read = []

    def __len__(self):
        return 7

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.x[i], self.y[i]


def _eval_worker(rank, init, out):
    import torch.distributed as dist

    from dinokit.eval.features import extract_features_sharded
    from dinokit.eval.monitor import KNNMonitor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vit = tiny_vit()
    bank, val = _Counting(0), _Counting(1)
    f, y = extract_features_sharded(vit, bank, batch_size=2)
    read = list(bank.read)
    res = KNNMonitor(bank, torch.utils.data.DataLoader(val, batch_size=3), ks=(3,)).evaluate(vit)
    torch.save({"f": f, "y": y, "read": read, "knn": res, "val_read": val.read}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_sharded_features_and_monitor_equal_one_process(tmp_path):
    """2 gloo processes: each sample is extracted once, the gathered features are in dataset
    order, and the monitor's summed votes give the 1-process accuracy."""
    import torch.multiprocessing as mp

    from dinokit.eval.monitor import KNNMonitor

    mp.start_processes(_eval_worker, args=(f"file://{tmp_path}/pg", str(tmp_path / "r")), nprocs=2,
                       start_method="fork")
    r = [torch.load(tmp_path / f"r.{i}", weights_only=True) for i in range(2)]
    torch.manual_seed(0)
    vit = tiny_vit()
    bank, val = _Counting(0), _Counting(1)
    f, y = extract_features(vit, torch.utils.data.DataLoader(bank, batch_size=7), progress=False)
    # every sample read, each process the same number of times (4: FSDP needs equal forward
    # passes), the shorter share padded by one repeat of its first sample
    for key in ("read", "val_read"):
        assert sorted(set(r[0][key] + r[1][key])) == list(range(7))
        assert len(r[0][key]) == len(r[1][key]) == 4 and r[1][key].count(r[1][key][0]) == 2
    for part in r:
        torch.testing.assert_close(part["f"], f, rtol=1e-5, atol=1e-6)
        assert torch.equal(part["y"], y)
    one = KNNMonitor(bank, val, ks=(3,)).evaluate(vit)
    ref = knn_evaluate(f, y, extract_features(vit, [(val.x, val.y)], progress=False)[0], val.y, ks=(3,))[3]
    assert r[0]["knn"] == r[1]["knn"] == one == pytest.approx(ref)


def test_knn_counts_over_query_shares_add_up_and_the_bank_moves_once(monkeypatch):
    from dinokit.eval.knn import knn_correct

    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(40, 8, generator=g), torch.randn(11, 8, generator=g)
    y, yt = torch.randint(0, 6, (40,), generator=g), torch.randint(0, 6, (11,), generator=g)
    whole = knn_correct(tr, y, te, yt, ks=(5,))[5]
    shares = knn_correct(tr, y, te[::2], yt[::2], ks=(5,))[5] + knn_correct(tr, y, te[1::2], yt[1::2], ks=(5,))[5]
    torch.testing.assert_close(shares, whole)
    res = knn_evaluate(tr, y, te, yt, ks=(5,))[5]
    assert res["top1"] == pytest.approx(100 * whole[0].item() / 11)
    assert res["top5"] == pytest.approx(100 * whole[1].item() / 11)
    calls = []
    original = torch.nn.functional.normalize
    monkeypatch.setattr(torch.nn.functional, "normalize", lambda x, **kw: calls.append(len(x)) or original(x, **kw))
    knn_classify(tr, y, te, ks=(5,), chunk_size=2)
    assert calls.count(40) == 1 and len(calls) == 1 + 6  # the bank once, then 6 query chunks


def test_linear_probe_sweeps_beyond_one_and_flags_an_edge():
    from dinokit.eval.linear import DEFAULT_LRS, linear_probe

    assert max(DEFAULT_LRS) > 1.0 and min(DEFAULT_LRS) < 0.01
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    with pytest.warns(UserWarning, match="edge of the sweep"):
        res = linear_probe(x, y, x, y, lrs=(1e-4, 2e-4), epochs=2, progress=False)
    assert res.at_edge
    with pytest.raises(ValueError, match="lrs"):
        linear_probe(x, y, x, y, lrs=(), progress=False)
