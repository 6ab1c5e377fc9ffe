"""The linear segmentation probe (``dinokit.eval.segmentation``), the mask-folder reader and
``dinokit eval seg``: scores against values computed by hand, the probe against a toy whose answer
is known, and one clear line naming the file for every mistake in a mask folder."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vit
from dinokit.cli import main
from dinokit.data.masks import MaskFolderDataset, MaskFolderError
from dinokit.eval.segmentation import (
    LinearSegmentationHead,
    confusion_matrix,
    patch_feature_map,
    segmentation_probe,
    segmentation_scores,
)


# ------------------------------------------------------------------ scores by hand
def test_miou_and_pixel_accuracy_of_a_hand_made_prediction():
    """3 classes, one ignored pixel. Pairs (truth, prediction) of the 8 scored pixels:
    (0,0) (0,1) (1,1) (1,1) (1,0) (2,2) (2,2) (2,1).
    class 0: TP 1, FN 1, FP 1 -> 1/3; class 1: TP 2, FN 1, FP 2 -> 2/5; class 2: TP 2, FN 1,
    FP 0 -> 2/3. mIoU = (1/3 + 2/5 + 2/3) / 3 = 7/15; pixel accuracy 5/8. The ignored pixel's
    prediction (0) counts nowhere; class 3 occurs in neither and is left out of the mean."""
    truth = torch.tensor([[0, 0, 1], [1, 1, 2], [2, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2], [2, 1, 0]])
    conf = confusion_matrix(pred, truth, 4, ignore_index=255)
    assert int(conf.sum()) == 8
    miou, pixel, per = segmentation_scores(conf)
    assert miou == pytest.approx(100 * 7 / 15)
    assert pixel == pytest.approx(100 * 5 / 8)
    assert [c["iou"] for c in per[:3]] == pytest.approx([100 / 3, 40.0, 200 / 3])
    assert [c["accuracy"] for c in per[:3]] == pytest.approx([50.0, 200 / 3, 200 / 3])
    assert per[3] == {"iou": None, "accuracy": None, "pixels": 0}


def _toy(n: int, seed: int, noise: float = 0.1):
    """Feature maps [n, 3, 4, 4] whose cells carry their class (one-hot + noise), masks [n, 8, 8]
    holding each cell's class on its 2x2 pixel block."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 3, (n, 4, 4), generator=g)
    feats = torch.nn.functional.one_hot(cells, 3).permute(0, 3, 1, 2).float() * 2
    feats += noise * torch.randn(feats.shape, generator=g)
    masks = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return feats, list(masks.unbind())


def test_the_probe_solves_a_separable_toy_and_not_a_scrambled_one():
    """Linearly separable cells: every pixel right after upsampling the logits to the masks'
    resolution (8x8 from a 4x4 grid). The same masks with features that carry no information
    score near chance (3 classes: mIoU about 20 %)."""
    f_tr, m_tr = _toy(64, 0)
    f_va, m_va = _toy(32, 1)
    res = segmentation_probe(f_tr, m_tr, f_va, m_va, 3, epochs=30, lrs=1e-2, progress=False)
    assert res.miou == pytest.approx(100.0) and res.pixel_accuracy == pytest.approx(100.0)
    assert res.head is not None and tuple(res.head(f_va[:2], (8, 8)).shape) == (2, 3, 8, 8)
    scrambled = torch.randn(f_tr.shape, generator=torch.Generator().manual_seed(2))
    res = segmentation_probe(scrambled, m_tr, torch.randn_like(f_va), m_va, 3, epochs=30, lrs=1e-2,
                             progress=False)
    assert res.miou < 40


def test_the_head_is_batch_norm_and_a_1x1_convolution_upsampled_bilinearly():
    torch.manual_seed(0)
    head = LinearSegmentationHead(5, 4).eval()
    x = torch.randn(2, 5, 3, 3)
    ref = torch.nn.functional.conv2d(head.bn(x), head.conv.weight, head.conv.bias)
    ref = torch.nn.functional.interpolate(ref, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(x, (12, 12)), ref)


def test_the_feature_map_of_the_last_blocks_is_the_grid_of_their_patch_tokens():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        one, two = patch_feature_map(vit, x, 1), patch_feature_map(vit, x, 2)
        patches = vit(x).patches
    assert one.shape == (2, 48, 6, 4) and two.shape == (2, 96, 6, 4)
    torch.testing.assert_close(one[:, :, 1, 2], patches[:, 1 * 4 + 2])
    torch.testing.assert_close(two[:, 48:], one)  # the last block comes last


# ------------------------------------------------------------------ mask folders
def _folder(root, n=3, size=(8, 6), ids=(0, 1, 2)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"im{i}.jpg")
        mask = rng.choice(np.array(ids, dtype=np.uint8), (size[1], size[0]))
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i}.png")
    return root


def test_a_good_mask_folder_pairs_images_with_masks(tmp_path):
    ds = MaskFolderDataset(_folder(tmp_path / "d"))
    assert len(ds) == 3 and ds.n_classes == 3
    img, mask = ds[1]
    assert img.size == (8, 6) and mask.shape == (6, 8) and mask.dtype == torch.long


def _missing_mask(root):
    (root / "masks" / "im1.png").unlink()
    return "im1.jpg has no mask", "im1.png"


def _orphan_mask(root):
    (root / "images" / "im2.jpg").unlink()
    return "mask", "im2.png has no image"


def _size(root):
    Image.fromarray(np.zeros((5, 8), dtype=np.uint8), mode="L").save(root / "masks" / "im0.png")
    return "im0.png is 8x5", "im0.jpg is"


def _out_of_range(root):
    shape = np.asarray(Image.open(root / "masks" / "im2.png")).shape
    Image.fromarray(np.full(shape, 7, dtype=np.uint8), mode="L").save(root / "masks" / "im2.png")
    return "im2.png holds class id 7", "outside 0..2"


def _rgb(root):
    shape = np.asarray(Image.open(root / "masks" / "im0.png")).shape
    Image.fromarray(np.zeros((*shape, 3), dtype=np.uint8)).save(root / "masks" / "im0.png")
    return "im0.png is a RGB image", "single-channel"


def _no_masks_folder(root):
    for p in (root / "masks").iterdir():
        p.unlink()
    (root / "masks").rmdir()
    return "masks does not exist", "images/<name>"


MISTAKES = {"missing mask": _missing_mask, "mask without image": _orphan_mask, "size mismatch": _size,
            "class id out of range": _out_of_range, "RGB mask": _rgb, "no masks folder": _no_masks_folder}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_every_mask_folder_mistake_is_one_error_naming_the_file(tmp_path, mistake):
    root = _folder(tmp_path / "d")
    expected = MISTAKES[mistake](root)
    with pytest.raises(MaskFolderError) as e:
        MaskFolderDataset(root, n_classes=3)
    text = str(e.value)
    assert "\n" not in text
    for part in expected:
        assert part in text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step DINO run of the demo preset's tiny ViT (patch 4) on digits."""
    out = tmp_path_factory.mktemp("runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", "--config", "demo", "data.dataset=digits", "data.limit=64", "data.batch_size=32",
                     "data.num_workers=0", "trainer.max_steps=2", "trainer.progress=false",
                     "backbone.kwargs={img_size: 28, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2, "
                     "in_chans: 1}", "dino.n_prototypes=32", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
                     f"trainer.output_dir={out}", "trainer.run_name=r"])
    assert code == 0
    return out / "r"


@pytest.mark.parametrize("mistake", ["missing mask", "size mismatch", "class id out of range"])
def test_eval_seg_reports_a_mask_folder_mistake_in_one_line_and_exits_2(tmp_path, tiny_run, capsys, mistake):
    good = _folder(tmp_path / "train", size=(28, 28))
    bad = _folder(tmp_path / "val", size=(28, 28))
    expected = MISTAKES[mistake](bad)
    code = main(["eval", "seg", "--checkpoint", str(tiny_run), "--train-data", str(good), "--val-data", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for part in expected:
        assert part in err


def test_eval_seg_on_a_folder_writes_scores_and_a_picture(tmp_path, tiny_run, capsys):
    data = _folder(tmp_path / "d", n=4, size=(28, 20), ids=(0, 1, 255))
    code = main(["eval", "seg", "--checkpoint", str(tiny_run), "--train-data", str(data), "--val-data", str(data),
                 "--epochs", "2", "--lrs", "0.01", "--show", "2", "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "seg.json").read_text())
    assert result["n_classes"] == 2 and result["ignore_index"] == 255 and result["size"] == 28
    assert result["lr"] == 0.01
    assert 0 <= result["miou"] <= 100 and set(result["per_class"]) == {"0", "1"}
    assert (tmp_path / "out" / "seg.png").stat().st_size > 0
    assert "mIoU" in capsys.readouterr().out


def test_eval_seg_refuses_a_learning_rate_that_is_not_positive_in_one_line(tiny_run, capsys):
    code = main(["eval", "seg", "--checkpoint", str(tiny_run), "--train-data", "scenes", "--val-data", "scenes",
                 "--lrs", "0.01", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--lrs" in err and "Traceback" not in err


def test_eval_seg_on_the_built_in_scenes_writes_into_the_run(tiny_run):
    code = main(["eval", "seg", "--checkpoint", str(tiny_run), "--train-data", "scenes", "--val-data", "scenes",
                 "--limit-train", "16", "--limit-val", "8", "--epochs", "1", "--show", "0"])
    assert code == 0
    result = json.loads((tiny_run / "eval" / "seg.json").read_text())
    assert result["size"] == 56 and result["n_classes"] == 11 and "background" in result["per_class"]


def test_eval_seg_reads_an_exported_backbone(tmp_path, tiny_run):
    assert main(["export", "--checkpoint", str(tiny_run), "--output", str(tmp_path / "vit")]) == 0
    data = _folder(tmp_path / "d", n=3, size=(28, 28))
    code = main(["eval", "seg", "--checkpoint", str(tmp_path / "vit.safetensors"), "--train-data", str(data),
                 "--val-data", str(data), "--epochs", "1", "--n-last-blocks", "2", "--show", "0",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "seg.json").read_text())
    assert result["n_last_blocks"] == 2 and result["n_classes"] == 3


def test_several_learning_rates_are_chosen_on_a_held_out_fifth_of_the_training_images():
    """Two epochs at the official 1e-3 leave the toy's head under-trained (its logits barely move
    from their N(0, 0.01) start); the sweep scores each rate on the held-out fifth, keeps the one
    that reads best there and retrains it on every training image."""
    f_tr, m_tr = _toy(40, 0, noise=0.5)
    f_va, m_va = _toy(32, 1, noise=0.5)
    slow = segmentation_probe(f_tr, m_tr, f_va, m_va, 3, lrs=(1e-4,), epochs=2, progress=False)
    res = segmentation_probe(f_tr, m_tr, f_va, m_va, 3, lrs=(1e-4, 1e-1), epochs=2, progress=False)
    assert slow.lr == 1e-4 and slow.lr_sweep == {}
    assert set(res.lr_sweep) == {1e-4, 1e-1} and res.lr_sweep[1e-1] > res.lr_sweep[1e-4]
    assert res.lr == 1e-1 and res.miou > slow.miou + 20
    assert res.to_dict()["lr"] == 1e-1
    few = segmentation_probe(f_tr[:4], m_tr[:4], f_va, m_va, 3, lrs=(1e-2, 1e-3), epochs=1, progress=False)
    assert few.lr == 1e-3 and few.lr_sweep == {}  # nothing to hold out: the official rate


def test_the_cli_knows_the_probe_s_learning_rates_without_loading_the_module():
    from dinokit.cli import segment
    from dinokit.eval import segmentation

    assert segment.PROBE_LRS == segmentation.PROBE_LRS and segment.DEFAULT_LR == segmentation.DEFAULT_LR
