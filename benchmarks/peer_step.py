"""One peer's training step as a worker, run in the peers' venv by ``step_time.py``:
``.bench-venv/bin/python peer_step.py LIBRARY METHOD JSON_ARGS`` (then the ``serve`` protocol).

Peers (each with its own defaults for the optimiser and everything the benchmark does not fix):
- ``stable-pretraining``: its ``methods.DINO`` / ``DINOv2`` / ``DINOv3`` modules, as in its docs.
- ``lightly``: its parts written with crops batched per resolution, as a strong user writes them
  (one backbone call per resolution, not lightly's example's one call per crop). DINO:
  ``DINOProjectionHead`` + ``DINOLoss``; DINOv2/v3: ``MaskedVisionTransformerTIMM``,
  ``DINOv2ProjectionHead`` heads, ``DINOLoss`` + ``IBOTPatchLoss`` + ``KoLeoLoss`` (EMA centring,
  not Sinkhorn-Knopp; 4 timm registers for v3). ``lightly-example``: its DINO example, one
  backbone call per crop.
- ``nidl``: its ``estimators.ssl.DINO`` driven without Lightning (``forward_student``,
  ``forward_teacher``, ``loss``, AdamW, ``momentum_updater``), projector without BatchNorm.
"""

from __future__ import annotations

import copy
import json
import sys

import timm
import torch
from common import make_views, random_masks, serve


def _timm(a: dict, registers: int = 0):
    kw = {"reg_tokens": registers} if registers else {}
    return timm.create_model(a["model"], num_classes=0, dynamic_img_size=True, img_size=a["gsize"], **kw)


def _autocast(a: dict):
    return torch.autocast(a["device"], dtype=torch.bfloat16, enabled=a["precision"] == "bf16")


def lightly_dino(a: dict, per_crop: bool = False):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = _timm(a)
    dim = backbone.num_features
    s_head = DINOProjectionHead(dim, a["hidden"], a["bottleneck"], a["prototypes"], freeze_last_layer=0)
    t_backbone = copy.deepcopy(backbone)
    t_head = DINOProjectionHead(dim, a["hidden"], a["bottleneck"], a["prototypes"])  # as lightly's example
    t_head.load_state_dict(s_head.state_dict())
    deactivate_requires_grad(t_backbone)
    deactivate_requires_grad(t_head)
    for m in (backbone, s_head, t_backbone, t_head):
        m.to(a["device"])
    criterion = DINOLoss(output_dim=a["prototypes"]).to(a["device"])
    opt = torch.optim.AdamW(list(backbone.parameters()) + list(s_head.parameters()), lr=1e-4)
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    b = a["batch"]

    def step():
        with _autocast(a):
            if per_crop:
                teacher_out = [t_head(t_backbone(v)) for v in glob]
                student_out = [s_head(backbone(v)) for v in glob + loc]
            else:
                with torch.no_grad():
                    teacher_out = list(t_head(t_backbone(torch.cat(glob))).split(b))
                s = [s_head(backbone(torch.cat(glob))), s_head(backbone(torch.cat(loc)))]
                student_out = list(torch.cat(s).split(b))
            loss = criterion(teacher_out, student_out, epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_momentum(backbone, t_backbone, m=0.996)
        update_momentum(s_head, t_head, m=0.996)

    return step


def lightly_dinov2(a: dict, registers: int = 0):
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    student = MaskedVisionTransformerTIMM(vit=_timm(a, registers))
    dim = student.vit.embed_dim
    s_dino = DINOv2ProjectionHead(dim, a["hidden"], a["bottleneck"], a["prototypes"])
    s_ibot = DINOv2ProjectionHead(dim, a["hidden"], a["bottleneck"], a["prototypes"])
    teacher = copy.deepcopy(student)
    t_dino, t_ibot = (DINOv2ProjectionHead(dim, a["hidden"], a["bottleneck"], a["prototypes"]) for _ in "ab")
    t_dino.load_state_dict(s_dino.state_dict())
    t_ibot.load_state_dict(s_ibot.state_dict())
    for m in (teacher, t_dino, t_ibot):
        deactivate_requires_grad(m)
    mods = [m.to(a["device"]) for m in (student, s_dino, s_ibot, teacher, t_dino, t_ibot)]
    dino_loss = DINOLoss(output_dim=a["prototypes"]).to(a["device"])
    ibot_loss = IBOTPatchLoss(output_dim=a["prototypes"]).to(a["device"])
    koleo = KoLeoLoss()
    params = [p for m in mods[:3] for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    b, ng, grid = a["batch"], a["n_global"], a["gsize"] // 16
    prefix = student.vit.num_prefix_tokens

    def step():
        g = torch.cat(glob)
        m = random_masks(ng * b, grid * grid, 0.3, a["device"])
        full = torch.cat([torch.zeros(ng * b, prefix, dtype=torch.bool, device=g.device), m], dim=1)
        with _autocast(a):
            with torch.no_grad():
                t_tok = teacher.encode(g)
                t_cls = t_dino(t_tok[:, 0])
                t_patch = t_ibot(t_tok[:, prefix:][m])
            s_tok = student.encode(g, mask=full)
            s_cls_g = s_tok[:, 0]
            s_cls_l = student.forward(torch.cat(loc))
            s_cls = s_dino(torch.cat([s_cls_g, s_cls_l]))
            s_patch = s_ibot(s_tok[:, prefix:][m])
            loss = dino_loss(list(t_cls.split(b)), list(s_cls.split(b)), epoch=0)
            loss = loss + ibot_loss(t_patch, s_patch, m.view(ng * b, grid, grid))
            loss = loss + 0.1 * sum(koleo(c) for c in s_cls_g.split(b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for s, t in zip(mods[:3], mods[3:]):
            update_momentum(s, t, m=0.992)

    return step


def spt(a: dict, method: str):
    import stable_pretraining as spt_lib

    if method == "dino":
        model = spt_lib.methods.DINO(_timm(a), projector_hidden_dim=a["hidden"],
                                     projector_bottleneck_dim=a["bottleneck"], n_prototypes=a["prototypes"])
    elif method == "dinov2":
        model = spt_lib.methods.DINOv2(_timm(a), projector_hidden_dim=a["hidden"],
                                       projector_bottleneck_dim=a["bottleneck"],
                                       n_cls_prototypes=a["prototypes"], n_patch_prototypes=a["prototypes"],
                                       image_size=a["gsize"])
    else:
        model = spt_lib.methods.DINOv3(_timm(a), n_register_tokens=4, projector_hidden_dim=a["hidden"],
                                       projector_bottleneck_dim=a["bottleneck"],
                                       n_cls_prototypes=a["prototypes"], n_patch_prototypes=a["prototypes"],
                                       image_size=a["gsize"])
    model = model.to(a["device"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    wrappers = [m for m in model.modules() if hasattr(m, "update_teacher")]

    def step():
        with _autocast(a):
            out = model(global_views=glob, local_views=loc)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        for w in wrappers:
            w.update_teacher()

    return step


def nidl_dino(a: dict):
    from nidl.estimators.ssl.dino import DINO

    backbone = _timm(a)
    model = DINO(backbone, proj_input_dim=backbone.num_features, proj_hidden_dim=a["hidden"],
                 proj_bottleneck_dim=a["bottleneck"], proj_output_dim=a["prototypes"], proj_batch_norm=False,
                 num_local_crops=a["n_local"]).to(a["device"])
    params = list(model.student.parameters()) + list(model.student_head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    views = glob + loc

    def step():
        with _autocast(a):
            z_s = model.forward_student(views)
            z_t = model.forward_teacher(views)
            loss = model.loss(z_t, z_s, epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.momentum_updater.update(model.student, model.teacher)
        model.momentum_updater.update(model.student_head, model.teacher_head)

    return step


def build(library: str, method: str, a: dict):
    if library == "stable-pretraining":
        return spt(a, method)
    if library == "lightly":
        return lightly_dino(a) if method == "dino" else lightly_dinov2(a, 4 if method == "dinov3" else 0)
    if library == "lightly-example" and method == "dino":
        return lightly_dino(a, per_crop=True)
    if library == "nidl" and method == "dino":
        return nidl_dino(a)
    raise ValueError(f"{library} has no {method} in this benchmark")


if __name__ == "__main__":
    lib, meth, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    serve(lambda: build(lib, meth, args), args)
