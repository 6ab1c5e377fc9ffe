"""Options that make DINOv2/v3 world-size invariant (the defaults stay the official rules):
``ibot.mask_sampling=sample`` (each image's masks from its own seed) and
``koleo.all_processes=true`` (KoLeo over the all-gathered global batch, DINOv3's
``KoLeoLossDistributed``)."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinokit.config import Config
from dinokit.data import MultiCropCollate
from dinokit.losses import koleo_loss
from dinokit.masking import make_mask_generator
from dinokit.train.loader import SeededCollate, _Batch

GRID, N, N_GLOBAL = (4, 4), 16, 2


def _items(n: int) -> list:
    return [({"global_views": [torch.full((1, 16, 16), float(i))] * N_GLOBAL, "local_views": []}, i)
            for i in range(n)]


def _collate(mode: str = "random", **kw) -> MultiCropCollate:
    kw = {"mask_probability": 0.5, "mask_ratio_range": (0.1, 0.5), **kw}
    return MultiCropCollate(make_mask_generator(mode, GRID), patch_size=4, mask_sampling="sample", **kw)


def _rows(masks: torch.Tensor, b: int, batch: int) -> torch.Tensor:
    """The n_global mask rows of image ``b`` (rows are view-major: ``v * B + b``)."""
    return torch.stack([masks[v * batch + b] for v in range(N_GLOBAL)])


def test_official_defaults_are_batch_masks_and_local_koleo():
    """The defaults are the official rules: masks spread over each batch (exactly
    ``int(n_global * B * p)`` masked crops), KoLeo within each process's batch."""
    cfg = Config()
    assert cfg.ibot.mask_sampling == "batch" and cfg.koleo.all_processes is False
    collate = MultiCropCollate(make_mask_generator("random", GRID), patch_size=4, mask_probability=0.5)
    assert collate.mask_sampling == "batch"
    torch.manual_seed(0)
    for b in (8, 4, 3):
        masks = collate(_items(b))["masks"]
        assert int(masks.any(-1).sum()) == int(N_GLOBAL * b * 0.5)
    with pytest.raises(ValueError, match="mask_sampling"):
        MultiCropCollate(make_mask_generator("random", GRID), patch_size=4, mask_sampling="rank")


def test_sample_masks_follow_a_hand_computed_draw():
    """Per crop, from random.Random(seed): masked?, ratio, then the generator's draws."""
    collate, seed = _collate(), 1234
    rng, expected = random.Random(seed), torch.zeros(N_GLOBAL, N, dtype=torch.bool)
    for v in range(N_GLOBAL):
        masked = rng.random() < 0.5
        ratio = 0.1 + (0.5 - 0.1) * rng.random()
        if masked:
            expected[v, rng.sample(range(N), int(N * ratio))] = True
    assert torch.equal(collate.sample_masks(N_GLOBAL, N, seed, GRID), expected)


@pytest.mark.parametrize("mode", ["random", "block"])
def test_sample_masks_do_not_depend_on_the_batch(mode):
    """An image's masks are the same in a batch of 8 and in either half of it (any order)."""
    collate, seeds = _collate(mode), [1000 + 7 * i for i in range(8)]
    items = _items(8)
    full = collate(items, sample_seeds=seeds)["masks"]
    assert full.any() and not full.all(-1).any()
    for part in (list(range(0, 8, 2)), list(range(1, 8, 2)), [5, 0, 7, 2]):
        half = collate([items[i] for i in part], sample_seeds=[seeds[i] for i in part])["masks"]
        for j, i in enumerate(part):
            assert torch.equal(_rows(half, j, len(part)), _rows(full, i, 8))
    # the official batch rule gives a batch of 4 other masks than the same images in a batch of 8
    official = MultiCropCollate(make_mask_generator(mode, GRID), patch_size=4, mask_probability=0.5)
    torch.manual_seed(0)
    assert int(official(items[:3])["masks"].any(-1).sum()) == 3  # int(2 * 3 * 0.5), whatever the draw


def test_seeded_collate_gives_sample_seeds_independent_of_rank_and_batch():
    views = _items(8)
    out = []
    for rank, keys in ((0, [64 + i for i in range(8)]), (1, [64 + 5, 64 + 1])):
        sc = SeededCollate(_collate(), seed=3)
        sc.rank = rank
        batch = _Batch(views[k - 64] for k in keys)
        batch.keys, batch.n = keys, 64
        out.append((keys, sc(batch)["masks"]))
    (keys8, m8), (keys2, m2) = out
    for j, k in enumerate(keys2):
        assert torch.equal(_rows(m2, j, 2), _rows(m8, keys8.index(k), 8))
    # epoch 1 (keys + n) draws other masks for the same image
    sc = SeededCollate(_collate(), seed=3)
    assert sc.item_seed(64 + 5, 64) != sc.item_seed(128 + 5, 64) and sc.item_seed(5, 64) == sc.item_seed(5, 64)


def test_sample_mask_weights_keep_the_official_normalisation():
    """``mask_weights``: 1 / (masked patches of the token's crop) for each masked token, in the flat
    order of ``masks``, zero padding to ``U = n_global * B * int(N * high)``."""
    collate = _collate(mask_ratio_range=(0.2, 0.75))
    out = collate(_items(5), sample_seeds=list(range(5)))
    masks, idx, w, n = out["masks"], out["mask_indices"], out["mask_weights"], int(out["n_masked"])
    assert idx.shape == w.shape == (N_GLOBAL * 5 * int(N * 0.75),)
    flat = [r * N + c for r in range(masks.shape[0]) for c in range(N) if masks[r, c]]
    assert n == len(flat) > 0 and idx[:n].tolist() == flat
    expected = [1.0 / int(masks[i // N].sum()) for i in flat]
    torch.testing.assert_close(w[:n], torch.tensor(expected))
    assert (w[n:] == 0).all() and (idx[n:] == 0).all()
    # every masked crop's weights sum to 1 (the official normalisation per crop)
    assert abs(float(w.sum()) - int(masks.any(-1).sum())) < 1e-5
    # the upper bound holds for every draw, masks on every crop at the highest ratio
    full = MultiCropCollate(make_mask_generator("random", GRID), patch_size=4, mask_probability=1.0,
                            mask_ratio_range=(0.5, 0.5), mask_sampling="sample")
    out = full(_items(3), sample_seeds=[1, 2, 3])
    assert int(out["n_masked"]) == out["mask_indices"].numel() == 6 * 8


# ----------------------------------------------------------- KoLeo over the global batch (2 processes)
def _koleo_reference(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo of the whole batch, written from the paper / official KoLeoLoss: nearest neighbour by
    the smallest distance between the L2-normalised rows, ``-mean log(||z_i - z_nn + 1e-8|| + eps)``."""
    z = x / x.norm(dim=1, keepdim=True).clamp(min=eps)
    d = torch.cdist(z.detach(), z.detach())
    d.fill_diagonal_(float("inf"))
    nn_idx = d.argmin(dim=1)
    return -torch.log((z - z[nn_idx] + 1e-8).norm(dim=1) + eps).mean()


def _koleo_worker(rank: int, init: str, x: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    res = {}
    for all_processes in (True, False):
        local = x[rank::2].clone().requires_grad_()  # the sampler deals order[rank::world]
        loss = koleo_loss(local, all_processes=all_processes)
        loss.backward()
        res[all_processes] = (loss.detach(), local.grad)
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_global_koleo_equals_koleo_of_the_concatenated_batch(tmp_path):
    """With ``all_processes``, the mean of the 2 processes' losses is the KoLeo of the global batch
    and their gradients, averaged as DDP does, are its gradient (also through neighbours held by the
    other process); per process (the official default) it is not."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_koleo_worker, args=(f"file://{tmp_path}/pg", x, str(tmp_path / "r")), nprocs=2,
                       start_method="fork")
    r = [torch.load(tmp_path / f"r.{i}", weights_only=True) for i in range(2)]
    ref_x = x.clone().requires_grad_()
    ref = _koleo_reference(ref_x)
    ref.backward()
    loss = (r[0][True][0] + r[1][True][0]) / 2
    torch.testing.assert_close(loss, ref.detach())
    grad = torch.empty_like(x)
    grad[0::2], grad[1::2] = r[0][True][1], r[1][True][1]
    torch.testing.assert_close(grad / 2, ref_x.grad)  # DDP averages the processes' gradients
    local = (r[0][False][0] + r[1][False][0]) / 2
    assert (local - ref).abs() > 1e-3  # the official per-process KoLeo differs on this batch


# ------------------------------------------------------------ data position at another world size
def _loader(monkeypatch, rank: int, world: int, batch: int):
    import dinokit.train.loader as loader

    monkeypatch.setattr(loader, "rank_world", lambda: (rank, world))
    ds = loader.SeededViews(list(range(40)), lambda x: x, seed=0)
    return loader.ResumableDataLoader(ds, batch_size=batch, seed=5, collate_fn=lambda b: [x for x, _ in b])


def test_loader_resumes_at_another_world_size_with_the_same_global_batch(monkeypatch):
    """2 processes x 4 took 2 batches each (samples order[0:16]); 1 process x 8 resumes at order[16:]
    and sees, batch by batch, the union of what the 2 processes would have taken."""
    from dinokit.config import ConfigError

    ranks = []
    for rank in (0, 1):
        dl = _loader(monkeypatch, rank, 2, 4)
        ranks.append(list(dl))
        it = iter(dl)
        next(it), next(it)
        state = dl.state_dict()
    assert state == {"epoch": 0, "batches": 2, "batch_size": 4, "world": 2}
    one = _loader(monkeypatch, 0, 1, 8)
    one.load_state_dict(state)
    rest = list(one)
    assert len(rest) == 5 - 2
    for k, batch in enumerate(rest):
        assert sorted(batch) == sorted(ranks[0][k + 2] + ranks[1][k + 2])
    with pytest.raises(ConfigError, match=r"data.batch_size.*global batches of 8.*data.batch_size=8"):
        _loader(monkeypatch, 0, 1, 4).load_state_dict(state)
    _loader(monkeypatch, 0, 1, 4).load_state_dict({"epoch": 0, "batches": 2})  # older checkpoints


def test_device_augmentation_collate_draws_the_same_per_sample_masks():
    """data.augment_on=device: UInt8Collate passes the per-sample seeds to the mask collate."""
    from dinokit.data.batched import UInt8Collate

    uint8 = UInt8Collate(_collate(), n_global=N_GLOBAL, global_size=16)
    assert uint8.mask_sampling == "sample" and UInt8Collate(None).mask_sampling == "batch"
    items = [(torch.zeros(1, 16, 16, dtype=torch.uint8), i) for i in range(4)]
    seeds = [11, 12, 13, 14]
    got = uint8(items, sample_seeds=seeds)
    want = _collate()(_items(4), sample_seeds=seeds)
    for k in ("masks", "mask_indices", "mask_weights", "n_masked"):
        assert torch.equal(got[k], want[k]), k
