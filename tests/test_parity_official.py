"""Parity with the official facebookresearch code (dino, dinov2, dinov3), term by term.

Each ``official_*`` function below is a short reference written for this test from the official
sources (file named in its docstring), run on the very same inputs as dinokit's part. The batch
geometry follows DINOv2: 2 global crops of B images, mask_probability 0.5, so half the global
crops carry no mask at all.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinokit.data import MultiCropCollate
from dinokit.ema import EMAUpdater
from dinokit.heads import DINOHead
from dinokit.losses import EMACenter, IBOTPatchLoss, gram_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from dinokit.losses.gram import resample_patch_grid
from dinokit.losses.koleo import koleo_loss_over_crops
from dinokit.masking import make_mask_generator
from dinokit.schedules import CosineSchedule, TeacherTemperature, WarmupCosine
from dinokit.train.optim import clip_per_module_, param_groups
from test_masking import official_masking_generator

# ----------------------------------------------------------------------------- references


def official_collate_masks(n_crops, grid, mask_ratio_tuple, mask_probability, rng, dinov3=False,
                           random_circular_shift=False):
    """dinov2/data/collate.py ``collate_data_and_cast`` (dinov3/data/collate.py with ``dinov3``),
    masks part, with ``rng`` standing in for the global ``random`` module."""
    N = grid[0] * grid[1]
    n_samples_masked = int(n_crops * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        if dinov3:
            mask = torch.BoolTensor(official_masking_generator(*grid, int(N * prob_max), rng))
            if random_circular_shift:
                shift_x, shift_y = rng.randint(0, mask.shape[0] - 1), rng.randint(0, mask.shape[1] - 1)
                mask = torch.roll(mask, (shift_x, shift_y), (0, 1))
        else:
            count = int(N * rng.uniform(prob_min, prob_max))
            mask = torch.BoolTensor(official_masking_generator(*grid, count, rng))
        masks_list.append(mask)
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, n_crops):
        masks_list.append(torch.BoolTensor(official_masking_generator(*grid, 0, rng)))
    rng.shuffle(masks_list)
    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {"collated_masks": collated_masks, "mask_indices_list": mask_indices_list,
            "masks_weight": masks_weight, "upperbound": upperbound,
            "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long)}


def official_sinkhorn(teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
    """dinov2/loss/ibot_patch_loss.py ``sinkhorn_knopp_teacher`` (one process)."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = n_masked_patches_tensor
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def official_forward_masked(s, t, student_masks_flat, student_temp, n_masked_patches=None, masks_weight=None):
    """dinov2/loss/ibot_patch_loss.py ``iBOTPatchLoss.forward_masked`` (dinov3 is the same)."""
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                        .expand_as(student_masks_flat)[student_masks_flat])
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight
    return -loss.sum() / student_masks_flat.shape[0]


class OfficialIBOTCenter:
    """dinov2 ``iBOTPatchLoss.softmax_center_teacher`` / ``update_center`` (lazy update, 1 process)."""

    def __init__(self, k, momentum=0.9):
        self.center, self.m, self.pending = torch.zeros(1, 1, k), momentum, None

    def softmax_center_teacher(self, tokens, temp):  # tokens [1, n, K]
        if self.pending is not None:
            batch_center, n = self.pending
            self.center = self.center * self.m + batch_center / n * (1 - self.m)
            self.pending = None
        return F.softmax((tokens - self.center) / temp, dim=-1)

    def update_center(self, tokens):  # tokens [1, n, K]
        self.pending = (torch.sum(tokens.mean(1), dim=0, keepdim=True), len(tokens))


class OfficialKoLeo(nn.Module):
    """dinov2/loss/koleo_loss.py ``KoLeoLoss`` (dinov3's is the same)."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def forward(self, student_output, eps=1e-8):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        dots = torch.mm(student_output, student_output.t())
        n = student_output.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, indices = torch.max(dots, dim=1)
        distances = self.pdist(student_output, student_output[indices])
        return -torch.log(distances + eps).mean()


def official_gram(output_feats, target_feats, apply_norm, img_level, remove_neg, remove_only_teacher_neg):
    """dinov3/loss/gram_loss.py ``GramLoss.forward``."""
    output_feats, target_feats = output_feats.float(), target_feats.float()
    if apply_norm:
        target_feats = F.normalize(target_feats, dim=-1)
    if not img_level and len(target_feats.shape) == 3:
        target_feats = target_feats.flatten(0, 1)
    target_sim = torch.matmul(target_feats, target_feats.transpose(-1, -2))
    if apply_norm:
        output_feats = F.normalize(output_feats, dim=-1)
    if not img_level and len(output_feats.shape) == 3:
        output_feats = output_feats.flatten(0, 1)
    student_sim = torch.matmul(output_feats, output_feats.transpose(-1, -2))
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    elif remove_only_teacher_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


def official_cosine_scheduler(base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0,
                              freeze_iters=0):
    """dinov2/utils/utils.py ``CosineScheduler`` (= dinov3 with trunc_extra 0): the full array."""
    freeze_schedule = np.zeros(freeze_iters)
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    with np.errstate(invalid="ignore", divide="ignore"):
        schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((freeze_schedule, warmup_schedule, schedule))


def official_linear_warmup_cosine_decay(start, peak, end, warmup_iterations, total_iterations,
                                        cosine_iterations=None):
    """dinov3/train/cosine_lr_scheduler.py ``linear_warmup_cosine_decay``."""
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = np.cos(np.linspace(0, np.pi, cosine_iterations))
    cosine = (cosine + 1) / 2
    cosine = (peak - end) * cosine + end
    remaining_iterations = total_iterations - cosine_iterations - warmup_iterations
    constant = np.full((remaining_iterations,), fill_value=end)
    return np.concatenate([linear, cosine, constant])


def official_vit_lr_decay_rate(name, lr_decay_rate, num_layers, force_is_backbone, tokens="register_tokens"):
    """dinov2/utils/param_groups.py ``get_vit_lr_decay_rate`` (dinov3: ``storage_tokens``), unchunked."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        keys = ("pos_embed", "patch_embed", "mask_token", "cls_token", tokens)
        if any("." + k in name for k in keys) or (force_is_backbone and any(k in name for k in keys)):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def official_param_groups(model, rule, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    """{name: (lr_multiplier, wd_multiplier, is_last_layer)}: DINO ``utils.get_params_groups``,
    DINOv2 ``get_params_groups_with_decay``, DINOv3 ``get_params_groups_with_decay_fsdp``."""
    n_blocks = len(model.blocks) if hasattr(model, "blocks") else 0
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if rule == "dino":
            wd = 0.0 if name.endswith(".bias") or len(param.shape) == 1 else 1.0
            out[name] = (1.0, wd, "last_layer" in name)  # main_dino cancel_gradients_last_layer
            continue
        tokens = "storage_tokens" if rule == "dinov3" else "register_tokens"
        lr = official_vit_lr_decay_rate(name, lr_decay_rate, n_blocks, n_blocks > 0, tokens)
        wd = 1.0
        if rule == "dinov2" and (name.endswith(".bias") or "norm" in name or "gamma" in name):
            wd = 0.0
        if rule == "dinov3" and (name.endswith("bias") or "norm" in name or "gamma" in name
                                 or "fourier_w" in name):
            wd = 0.0
        if "patch_embed" in name:
            lr *= patch_embed_lr_mult
        out[name] = (lr, wd, "last_layer" in name)
    return out


class OfficialDINOv2Head(nn.Module):
    """dinov2/layers/dino_head.py ``DINOHead`` (weight-normalised prototypes, trainable gain)."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=16, bottleneck_dim=8, weight_norm=True):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = torch.nn.utils.parametrizations.weight_norm(last) if weight_norm else last

    def forward(self, x):
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


# ----------------------------------------------------------------------------- a DINOv2 batch

B, N_GLOBAL, GRID, K = 4, 2, (4, 4), 12


def _item(i):
    return {"global_views": [torch.full((3, 16, 16), float(i + v)) for v in range(N_GLOBAL)],
            "local_views": []}, i


def _dinov2_batch(seed=0):
    collate = MultiCropCollate(make_mask_generator("block", GRID), patch_size=4, mask_probability=0.5,
                               mask_ratio_range=(0.1, 0.5))
    torch.manual_seed(seed)
    return collate, collate([_item(i) for i in range(B)])


# ----------------------------------------------------------------------------- collate


@pytest.mark.parametrize(("dinov3", "shift"), [(False, False), (True, False), (True, True)])
def test_collate_masks_indices_and_weights_equal_the_official_collate(dinov3, shift):
    n_crops, n = N_GLOBAL * B * 2, 14 * 14
    collate = MultiCropCollate(make_mask_generator("block", (14, 14)), patch_size=16,
                               ratio_sampling="upper" if dinov3 else "uniform", random_circular_shift=shift)
    for seed in range(6):
        want = official_collate_masks(n_crops, (14, 14), (0.1, 0.5), 0.5, random.Random(seed), dinov3, shift)
        masks = collate.make_masks(n_crops, n, random.Random(seed), (14, 14))
        assert torch.equal(masks, want["collated_masks"])
        u = collate.upper_bound(n_crops // N_GLOBAL, n, N_GLOBAL)
        assert u == want["upperbound"]
        got = collate.index_masks(masks, u)
        k = int(got["n_masked"])
        assert k == int(want["n_masked_patches"]) and got["n_masked"].shape == ()
        assert got["mask_indices"].shape == (u,) and got["mask_weights"].shape == (u,)
        assert torch.equal(got["mask_indices"][:k], want["mask_indices_list"])
        assert torch.equal(got["mask_weights"][:k], want["masks_weight"])
        assert not got["mask_indices"][k:].any() and not got["mask_weights"][k:].any()


def test_collate_batch_carries_static_index_buffers():
    collate, batch = _dinov2_batch()
    n = GRID[0] * GRID[1]
    u = collate.upper_bound(B, n, N_GLOBAL)
    assert batch["masks"].shape == (N_GLOBAL * B, n)
    assert int((batch["masks"].sum(1) == 0).sum()) >= N_GLOBAL * B // 2  # half the crops: no mask
    shapes = set()
    for seed in range(5):
        _, b = _dinov2_batch(seed)
        shapes.add((tuple(b["mask_indices"].shape), tuple(b["mask_weights"].shape)))
        flat = b["masks"].flatten()
        k = int(b["n_masked"])
        assert flat[b["mask_indices"][:k]].all() and int(flat.sum()) == k
        assert b["mask_weights"].sum().item() == pytest.approx(float((b["masks"].sum(1) > 0).sum()))
    assert shapes == {((u,), (u,))}
    assert "mask_indices" not in MultiCropCollate()([_item(i) for i in range(B)])  # DINO v1: unchanged


# ----------------------------------------------------------------------------- iBOT + Sinkhorn


def _masked_tokens(batch, seed=1):
    """Student/teacher patch-head outputs for every token, gathered into the static buffer."""
    g = torch.Generator().manual_seed(seed)
    n_tok = N_GLOBAL * B * GRID[0] * GRID[1]
    s_table = torch.randn(n_tok, K, generator=g).requires_grad_()
    t_table = torch.randn(n_tok, K, generator=g) * 0.3  # head logits; official exp() overflows past ~88
    idx = batch["mask_indices"]
    valid = torch.arange(idx.shape[0]) < batch["n_masked"]
    return s_table, t_table, idx, valid


def test_sinkhorn_on_a_padded_buffer_equals_the_official_on_the_masked_tokens():
    _, batch = _dinov2_batch()
    _, t_table, idx, valid = _masked_tokens(batch)
    k = int(batch["n_masked"])
    logits = t_table[idx]
    logits[~valid] = torch.randn(int((~valid).sum()), K) * 50  # garbage in the padding
    got = sinkhorn_knopp(logits, 0.07, 3, valid=valid)
    want = official_sinkhorn(t_table[idx[:k]], 0.07, batch["n_masked"].clone().float())
    torch.testing.assert_close(got[:k], want, rtol=1e-5, atol=1e-7)
    assert torch.equal(got[k:], torch.zeros_like(got[k:]))


def test_ibot_loss_and_gradient_equal_the_official_with_half_the_crops_unmasked():
    _, batch = _dinov2_batch()
    s_table, t_table, idx, valid = _masked_tokens(batch)
    masks, k = batch["masks"], int(batch["n_masked"])
    n_crops = masks.shape[0]
    assert int((masks.sum(1) > 0).sum()) < n_crops  # some crops carry no mask
    loss_fn = IBOTPatchLoss(K, student_temp=0.1)
    t_probs = loss_fn.teacher_probs(t_table[idx], 0.07, valid=valid)
    got = loss_fn(s_table[idx], t_probs, batch["mask_weights"], n_crops)
    (g_got,) = torch.autograd.grad(got, s_table)

    flat = masks.flatten()
    t_off = official_sinkhorn(t_table[flat], 0.07, batch["n_masked"].clone().float())
    want = official_forward_masked(s_table[flat], t_off, masks, 0.1)
    (g_want,) = torch.autograd.grad(want, s_table)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-8)
    assert k < idx.shape[0]  # the buffer was padded
    assert ibot_patch_loss(s_table[idx], t_probs, batch["mask_weights"], n_crops).item() == pytest.approx(
        want.item(), rel=1e-5)


def test_ibot_ema_centring_equals_the_official_softmax_center():
    loss_fn = IBOTPatchLoss(K, centering="ema", center_momentum=0.9)
    official = OfficialIBOTCenter(K, 0.9)
    for seed in range(3):
        _, batch = _dinov2_batch(seed)
        _, t_table, idx, valid = _masked_tokens(batch, seed)
        k = int(batch["n_masked"])
        logits = t_table[idx]
        logits[~valid] = 1e4  # padding must not move the centre
        got = loss_fn.teacher_probs(logits, 0.07, valid=valid)
        loss_fn.update_center(logits, valid=valid)
        tokens = t_table[idx[:k]].unsqueeze(0)
        want = official.softmax_center_teacher(tokens, 0.07).squeeze(0)
        official.update_center(tokens)
        torch.testing.assert_close(got[:k], want, rtol=1e-5, atol=1e-7)
    official.softmax_center_teacher(tokens, 0.07)  # applies the pending update
    torch.testing.assert_close(loss_fn.center.center, official.center.flatten(), rtol=1e-5, atol=1e-6)
    before = loss_fn.center.center.clone()
    loss_fn.update_center(logits, valid=valid, apply=torch.tensor(False))
    assert torch.equal(loss_fn.center.center, before)


def test_dino_centre_equals_the_official_update():
    """dino/main_dino.py ``DINOLoss.update_center``: sum / (len * world), EMA with m."""
    c = EMACenter(K, 0.9)
    center = torch.zeros(1, K)
    for seed in range(3):
        out = torch.randn(2 * B, K, generator=torch.Generator().manual_seed(seed))
        c.update(out)
        batch_center = torch.sum(out, dim=0, keepdim=True) / len(out)
        center = center * 0.9 + batch_center * (1 - 0.9)
    torch.testing.assert_close(c.center, center.flatten())


# ----------------------------------------------------------------------------- KoLeo


def test_koleo_equals_the_official_with_duplicates_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g)
    x[3] = x[1]  # an exact duplicate: the official distance is ||eps * 1|| inside PairwiseDistance
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = koleo_loss(a), OfficialKoLeo()(b)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_koleo_over_global_crops_is_dinov2s_sum():
    """ssl_meta_arch: ``koleo_weight * sum(koleo(p) for p in cls.chunk(2))`` (DINOv3: mean * n_global)."""
    cls = torch.randn(N_GLOBAL * B, 6, generator=torch.Generator().manual_seed(3))
    want = sum(OfficialKoLeo()(p) for p in cls.chunk(N_GLOBAL))
    torch.testing.assert_close(koleo_loss_over_crops(cls.view(N_GLOBAL, B, -1)), want)
    dinov3 = sum(OfficialKoLeo()(x) for x in cls.view(N_GLOBAL, B, -1)) / N_GLOBAL * N_GLOBAL
    torch.testing.assert_close(koleo_loss_over_crops(cls.view(N_GLOBAL, B, -1)), dinov3)


# ----------------------------------------------------------------------------- Gram


@pytest.mark.parametrize(("normalize", "img_level", "neg"),
                         list(itertools.product([True, False], [True, False], ["none", "both", "teacher"])))
def test_gram_loss_equals_the_official_for_every_option(normalize, img_level, neg):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 5, 6, generator=g)
    t = torch.randn(3, 5, 6, generator=g)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    opts = dict(remove_neg=neg == "both", remove_only_teacher_neg=neg == "teacher")
    got = gram_loss(a, t, normalize=normalize, img_level=img_level, **opts)
    want = official_gram(b, t, normalize, img_level, *opts.values())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_gram_defaults_are_the_dinov3_gram_anchoring_config():
    """dinov3_vit7b16_gram_anchor.yaml: normalized true, img_level true, remove_neg false."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    torch.testing.assert_close(gram_loss(s, t), official_gram(s, t, True, True, False, False))


def test_resample_patch_grid_equals_the_official_gram_teacher_downsampling():
    """ssl_meta_arch ``get_gram_teacher_output``: [B, P_T, D] -> [B, D, N, N] -> bicubic -> [B, P, D]."""
    g = torch.Generator().manual_seed(6)
    teacher = torch.randn(2, 8 * 8, 5, generator=g)
    patches_hw = teacher.transpose(-2, -1).unflatten(-1, (8, 8))
    patches_hw = F.interpolate(patches_hw, size=(4, 4), mode="bicubic", align_corners=False, antialias=False)
    want = patches_hw.flatten(-2, -1).transpose(-2, -1)
    torch.testing.assert_close(resample_patch_grid(teacher, (8, 8), (4, 4)), want)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(("base", "final", "total", "warmup", "start", "freeze"),
                         [(2e-3, 1e-6, 100, 10, 0.0, 0), (0.04, 0.4, 57, 0, 0.0, 0),
                          (0.996, 1.0, 40, 0, 0.0, 0), (5e-4, 1e-6, 60, 20, 1e-5, 7)])
def test_cosine_schedule_equals_dinov2_cosine_scheduler_and_dino_cosine_scheduler(
        base, final, total, warmup, start, freeze):
    want = official_cosine_scheduler(base, final, total, warmup, start)
    want[:freeze] = 0  # dinov2 train.py: last_layer_lr_schedule.schedule[:freeze] = 0
    sched = CosineSchedule(base, final, total, warmup, start, freeze_steps=freeze)
    got = np.array([sched(i) for i in range(total)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert sched(total) == final and sched(total + 5) == final  # CosineScheduler.__getitem__
    if warmup:
        assert sched(warmup - 1) == base


def test_teacher_temperature_equals_dino_and_dinov2_schedules():
    # DINO v1 (per epoch): concatenate(linspace(0.04, 0.07, 30), ones(70) * 0.07)
    dino = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    t = TeacherTemperature(0.04, 0.07, 30)
    np.testing.assert_allclose([t(e) for e in range(100)], dino, rtol=1e-12)
    # DINOv2 (per iteration): CosineScheduler(0.07, 0.07, total=W, warmup=W, start=0.04), W = 30 * 10
    w = 300
    v2 = official_cosine_scheduler(0.07, 0.07, w, w, 0.04)
    t2 = TeacherTemperature(0.04, 0.07, w)
    np.testing.assert_allclose([t2(i) for i in range(w)], v2, rtol=1e-12)
    assert t2(w - 1) == 0.07 and t2(w + 10) == 0.07
    # DINOv3 schedules v2: linear_warmup_cosine_decay(0.04, 0.07, 0.07, W, total)
    v3 = official_linear_warmup_cosine_decay(0.04, 0.07, 0.07, w, 2 * w)
    t3 = TeacherTemperature(0.04, 0.07, w, endpoint=False)
    np.testing.assert_allclose([t3(i) for i in range(2 * w)], v3, rtol=1e-12)


@pytest.mark.parametrize(("start", "peak", "end", "warmup", "total", "cosine"),
                         [(0, 5e-5, 5e-5, 10, 40, None), (0.0, 1e-3, 1e-6, 7, 50, None),
                          (0.04, 0.07, 0.07, 0, 20, None), (0.0, 1.0, 0.1, 5, 30, 15)])
def test_warmup_cosine_equals_dinov3_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine):
    want = official_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine)
    sched = WarmupCosine(start, peak, end, warmup, total, cosine)
    np.testing.assert_allclose([sched(i) for i in range(total)], want, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- heads


def _copy_head(ours, official):
    with torch.no_grad():
        for a, b in zip([m for m in ours.mlp if isinstance(m, nn.Linear)],
                        [m for m in official.mlp if isinstance(m, nn.Linear)]):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)


def test_dinov2_head_outputs_equal_the_official_head_with_the_same_weights():
    torch.manual_seed(0)
    ours = DINOHead(6, out_dim=K, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    official = OfficialDINOv2Head(6, K)
    _copy_head(ours, official)
    with torch.no_grad():
        official.last_layer.parametrizations.weight.original1.copy_(ours.last_layer.weight_v)
        official.last_layer.parametrizations.weight.original0.copy_(ours.last_layer.weight_g)
        ours.last_layer.weight_g.mul_(1.5)
        official.last_layer.parametrizations.weight.original0.mul_(1.5)
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), official(x))
    # a bottleneck output below 1e-6 in norm: the official eps (1e-12) still normalises it
    with torch.no_grad():
        for head in (ours, official):
            head.mlp[-1].weight.mul_(1e-9)
            head.mlp[-1].bias.mul_(1e-9)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-5)
    assert ours.last_layer.weight_g.requires_grad  # DINOv2 trains the gain


def test_dinov3_head_is_a_plain_linear_with_trunc_normal_init():
    torch.manual_seed(0)
    ours = DINOHead(6, out_dim=K, hidden_dim=16, bottleneck_dim=8, weight_norm=False)
    assert isinstance(ours.last_layer, nn.Linear) and ours.last_layer.bias is None
    official = OfficialDINOv2Head(6, K, weight_norm=False)
    _copy_head(ours, official)
    with torch.no_grad():
        official.last_layer.weight.copy_(ours.last_layer.weight)
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), official(x))
    big = DINOHead(8, out_dim=4096, hidden_dim=16, bottleneck_dim=256, weight_norm=False)
    assert big.last_layer.weight.std().item() == pytest.approx(0.02, rel=0.03)


def test_weight_norm_prototypes_keep_nn_linear_default_init():
    """DINO/DINOv2 build ``last_layer`` after ``self.apply(self._init_weights)``: v keeps
    ``nn.Linear``'s kaiming-uniform init, U(-1/sqrt(in), 1/sqrt(in)), and g is set to 1."""
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=4096, hidden_dim=16, bottleneck_dim=256)
    v = head.last_layer.weight_v
    bound = 1 / math.sqrt(256)
    assert v.abs().max().item() <= bound
    assert v.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.equal(head.last_layer.weight_g, torch.ones(4096, 1))


# ----------------------------------------------------------------------------- optimiser


class _DINOv2NamedViT(nn.Module):
    """Parameters named as the official DINOv2 ViT (and DINOv3's ``storage_tokens``)."""

    def __init__(self, tokens="register_tokens", depth=3, d=8):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        setattr(self, tokens, nn.Parameter(torch.zeros(1, 2, d)))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 4, 4)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm1 = nn.LayerNorm(d)
            blk.attn = nn.Linear(d, d)
            blk.ls1 = nn.Module()
            blk.ls1.gamma = nn.Parameter(torch.ones(d))
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(d)


@pytest.mark.parametrize("rule", ["dino", "dinov2", "dinov3"])
def test_param_groups_equal_the_official_rules(rule):
    tokens = "storage_tokens" if rule == "dinov3" else "register_tokens"
    backbone = _DINOv2NamedViT(tokens)
    head = DINOHead(8, out_dim=K, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    student = nn.ModuleDict({"backbone": backbone, "dino_head": head})
    decay, mult = (1.0, 1.0) if rule == "dino" else (0.9, 0.2)
    want = {}
    for key, module in student.items():
        for name, v in official_param_groups(module, rule, decay, mult).items():
            want[f"{key}.{name}"] = v
    groups = param_groups(student.named_parameters(), no_decay_rule=rule, layer_decay=decay,
                          n_blocks=len(backbone.blocks), patch_embed_lr_mult=mult)
    got = {n: (g["lr_scale"], g["wd_scale"], g["is_last_layer"]) for g in groups for n in g["names"]}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name]), name
    # the learned tokens are decayed by every official rule
    assert got[f"backbone.{tokens}"][1] == 1.0 and got["backbone.pos_embed"][1] == 1.0


def test_clip_per_module_equals_clip_grad_norm_of_each_module():
    """DINOv2/v3 train.py: ``clip_grad_norm_(v.parameters(), clip)`` for each student module."""
    torch.manual_seed(0)
    modules = {"backbone": nn.Linear(4, 3), "dino_head": nn.Linear(3, 5), "ibot_head": nn.Linear(3, 2)}
    grads = {k: [torch.randn_like(p) * s for p in m.parameters()]
             for (k, m), s in zip(modules.items(), (10.0, 0.1, 3.0))}
    want = {}
    for k, m in modules.items():
        for p, g in zip(m.parameters(), grads[k]):
            p.grad = g.clone()
        want[k] = (torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0), [p.grad.clone() for p in m.parameters()])
        for p, g in zip(m.parameters(), grads[k]):
            p.grad = g.clone()
    norms = clip_per_module_({k: list(m.parameters()) for k, m in modules.items()}, 1.0)
    for k, m in modules.items():
        torch.testing.assert_close(norms[k], want[k][0])
        for p, g in zip(m.parameters(), want[k][1]):
            torch.testing.assert_close(p.grad, g)


def test_ema_equals_the_official_foreach_update():
    """dinov3 ``update_ema`` / dinov2 ``update_teacher``: _foreach_mul_(t, m); _foreach_add_(t, s, 1 - m)."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    t_ref = [p.detach().clone() for p in teacher.parameters()]
    torch._foreach_mul_(t_ref, 0.994)
    torch._foreach_add_(t_ref, [p.detach() for p in student.parameters()], alpha=1 - 0.994)
    EMAUpdater(teacher, student)(0.994)
    for t, r in zip(teacher.parameters(), t_ref):
        assert torch.equal(t, r)


def test_masked_token_terms_trace_as_one_graph_without_host_syncs():
    """No ``.item()``, ``nonzero()`` or boolean indexing: dynamo traces them with fullgraph=True."""
    _, batch = _dinov2_batch()
    s_table, t_table, idx, valid = _masked_tokens(batch)
    ema = IBOTPatchLoss(K, centering="ema")
    sk = IBOTPatchLoss(K)

    def step(s, t, weights, valid, n_crops):
        loss = sk(s, sk.teacher_probs(t, 0.07, valid=valid), weights, n_crops)
        loss = loss + ema(s, ema.teacher_probs(t, 0.07, valid=valid), weights, n_crops)
        ema.update_center(t, valid=valid, apply=torch.isfinite(loss))
        return loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    args = (s_table[idx].detach(), t_table[idx], batch["mask_weights"], valid, torch.tensor(8.0))
    center = ema.center.center.clone()
    got = compiled(*args)
    moved = ema.center.center.clone()
    ema.center.center.copy_(center)
    torch.testing.assert_close(got, step(*args))
    torch.testing.assert_close(moved, ema.center.center)
