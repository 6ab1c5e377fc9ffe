"""The multi-crop collate and its iBOT masks (dinokit.data.collate)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from PIL import Image

from dinokit.data import MultiCropCollate, MultiCropConfig, MultiCropTransform, TransformDataset
from dinokit.masking import make_mask_generator


def item(i: int, n_global: int = 2, n_local: int = 2, g: tuple = (3, 8, 8), loc: tuple = (3, 4, 4),
         label=None):
    """Views whose every pixel encodes (image i, crop k): value 10 * i + k."""
    views = {"global_views": [torch.full(g, 10.0 * i + k) for k in range(n_global)],
             "local_views": [torch.full(loc, 10.0 * i + n_global + k) for k in range(n_local)]}
    return views, (i if label is None else label)


def test_shapes_order_and_labels():
    batch = MultiCropCollate()([item(i) for i in range(3)])
    assert set(batch) == {"global_views", "local_views", "labels", "masks"}  # DINO v1: no index masks
    assert [tuple(v.shape) for v in batch["global_views"]] == [(3, 3, 8, 8)] * 2
    assert [tuple(v.shape) for v in batch["local_views"]] == [(3, 3, 4, 4)] * 2
    for k, view in enumerate(batch["global_views"] + batch["local_views"]):
        assert view[:, 0, 0, 0].tolist() == [10.0 * i + k for i in range(3)]  # [view][image]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2]
    assert batch["masks"] is None


def test_unlabelled_items_and_no_local_crops():
    items = [(item(0, n_local=0)[0], None), (item(1, n_local=0)[0], torch.tensor(4)), item(2, n_local=0)[0]]
    batch = MultiCropCollate()(items)
    assert batch["labels"].tolist() == [-1, 4, -1]
    assert batch["local_views"] == [] and len(batch["global_views"]) == 2


def test_inconsistent_items_are_named():
    with pytest.raises(ValueError, match="item 2 has 1 local_views but item 0 has 2"):
        MultiCropCollate()([item(0), item(1), item(2, n_local=1)])
    with pytest.raises(ValueError, match="item 1 has 3 global_views but item 0 has 2"):
        MultiCropCollate()([item(0), item(1, n_global=3)])
    with pytest.raises(ValueError, match=r"item 1 has global_views\[0\] of shape \(3, 6, 6\) but item 0 has \(3, 8, 8\)"):
        MultiCropCollate()([item(0), item(1, g=(3, 6, 6))])
    with pytest.raises(ValueError, match=r"item 1 has local_views\[0\] of shape \(1, 4, 4\)"):
        MultiCropCollate()([item(0), item(1, loc=(1, 4, 4))])
    with pytest.raises(TypeError, match="item 0"):
        MultiCropCollate()([(torch.zeros(3, 8, 8), 0)])
    with pytest.raises(ValueError, match="empty"):
        MultiCropCollate()([])


def test_argument_checks_name_the_argument():
    gen = make_mask_generator("random", (2, 2))
    with pytest.raises(ValueError, match="patch_size"):
        MultiCropCollate(gen)
    with pytest.raises(ValueError, match="mask_probability"):
        MultiCropCollate(gen, patch_size=4, mask_probability=1.5)
    with pytest.raises(ValueError, match="mask_ratio_range"):
        MultiCropCollate(gen, patch_size=4, mask_ratio_range=(0.6, 0.2))
    with pytest.raises(ValueError, match="mask_ratio_range"):
        MultiCropCollate(gen, patch_size=4, mask_ratio_range=(0.1, 1.2))
    with pytest.raises(ValueError, match="N = 4"):  # a generator made for another grid
        MultiCropCollate(make_mask_generator("random", (3, 3)), patch_size=4,
                         mask_probability=1.0)([item(0)])


def test_masks_align_with_the_concatenated_global_views():
    # 16 x 12 global crops and 4-px patches: N = 4 * 3 = 12; rows = n_global * B = 2 * 5
    collate = MultiCropCollate(make_mask_generator("random", (4, 3)), patch_size=4)
    batch = collate([item(i, g=(3, 16, 12)) for i in range(5)])
    assert batch["masks"].shape == (10, 12) and batch["masks"].dtype == torch.bool
    assert torch.cat(batch["global_views"]).shape[0] == batch["masks"].shape[0]


def test_mask_ratios_are_spread_over_the_range_like_dinov2():
    # 2 views x 8 images = 16 crops, mask_probability 0.5: int(16 * 0.5) = 8 masked crops. Masked
    # crop i gets int(N * r), r uniform in the i-th of 8 equal slices of [0.1, 0.5], so the k-th
    # smallest count lies in [floor(N * e_k), floor(N * e_k+1)]; the other 8 crops are empty.
    n = 64
    edges = [0.1 + 0.4 * k / 8 for k in range(9)]
    collate = MultiCropCollate(make_mask_generator("random", (8, 8)), patch_size=4,
                               mask_probability=0.5, mask_ratio_range=(0.1, 0.5))
    torch.manual_seed(0)
    positions = []
    for _ in range(20):
        masks = collate([item(i, g=(3, 32, 32)) for i in range(8)])["masks"]
        counts = masks.sum(dim=1)
        assert int((counts == 0).sum()) == 8
        masked = sorted(int(c) for c in counts if c > 0)
        for k, c in enumerate(masked):
            assert math.floor(n * edges[k]) <= c <= math.floor(n * edges[k + 1]), (k, c)
        positions.append(torch.nonzero(counts > 0).flatten())
    # the masked crops are shuffled among the rows, not always the first ones
    assert len({tuple(p.tolist()) for p in positions}) > 10


def test_block_masks_in_the_collate_stay_under_the_ratio_range():
    collate = MultiCropCollate(make_mask_generator("block", (8, 8)), patch_size=4,
                               mask_probability=0.75, mask_ratio_range=(0.2, 0.4))
    torch.manual_seed(1)
    masks = torch.cat([collate([item(i, g=(3, 32, 32)) for i in range(4)])["masks"] for _ in range(10)])
    ratios = masks.float().mean(dim=1)
    assert masks.shape == (80, 64)
    assert int((ratios > 0).sum()) == 10 * int(8 * 0.75)
    assert ratios.max() <= 0.4 and ratios[ratios > 0].min() >= 0.1  # near 0.2 even when short


def test_masks_follow_torch_seed_and_a_plain_one_argument_generator_works():
    collate = MultiCropCollate(make_mask_generator("block", (8, 8)), patch_size=4)
    items = [item(i, g=(3, 32, 32)) for i in range(4)]
    torch.manual_seed(3)
    a = collate(items)["masks"]
    torch.manual_seed(3)
    assert torch.equal(a, collate(items)["masks"])

    def first_k(k: int) -> torch.Tensor:  # no rng argument: called with the count only
        return torch.arange(64) < k

    plain = MultiCropCollate(first_k, patch_size=4, mask_probability=1.0, mask_ratio_range=(0.5, 0.5))
    assert plain(items)["masks"].sum(dim=1).tolist() == [32] * 8


def test_collate_pickles_and_runs_in_a_dataloader():
    collate = pickle.loads(pickle.dumps(MultiCropCollate(make_mask_generator("block", (4, 4)), patch_size=4)))
    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=3)
    images = [(Image.new("RGB", (20, 20), (40 * i, 0, 0)), i % 2) for i in range(6)]
    loader = torch.utils.data.DataLoader(TransformDataset(images, MultiCropTransform(cfg)), batch_size=3,
                                         collate_fn=collate)
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch["global_views"]] == [(3, 3, 16, 16)] * 2
    assert [tuple(v.shape) for v in batch["local_views"]] == [(3, 3, 8, 8)] * 3
    assert batch["labels"].tolist() == [0, 1, 0] and batch["masks"].shape == (6, 16)


def test_upper_bound_is_the_official_static_bound():
    """DINOv2: sum over the int(2 B p) masked crops of int(N * linspace(low, high, n + 1)[i + 1])."""
    collate = MultiCropCollate(make_mask_generator("block", (14, 14)), patch_size=16)
    probs = torch.linspace(0.1, 0.5, 64 + 1)
    assert collate.upper_bound(64, 196) == sum(int(196 * probs[i + 1]) for i in range(64))
    assert collate.upper_bound(1, 196) == int(196 * 0.5)  # one masked crop of two
    assert collate.upper_bound(4, 196, n_global=1) == int(196 * 0.3) + int(196 * 0.5)


def test_index_buffers_keep_their_shape_across_batches():
    collate = MultiCropCollate(make_mask_generator("block", (8, 8)), patch_size=4)
    u = collate.upper_bound(4, 64)
    torch.manual_seed(0)
    for _ in range(5):
        b = collate([item(i, g=(3, 32, 32)) for i in range(4)])
        assert b["mask_indices"].shape == (u,) and b["mask_weights"].shape == (u,)
        assert b["mask_indices"].dtype == torch.long and b["mask_weights"].dtype == torch.float32
        k = int(b["n_masked"])
        assert k == int(b["masks"].sum()) and not b["mask_weights"][k:].any()


def test_ratio_sampling_is_checked():
    with pytest.raises(ValueError, match="ratio_sampling"):
        MultiCropCollate(make_mask_generator("block", (8, 8)), patch_size=4, ratio_sampling="max")
