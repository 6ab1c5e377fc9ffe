"""One peer's DINO training step, run in the peers' venv: ``python peer_step.py NAME JSON_ARGS``.

lightly: written as its own DINO example does it (DINOProjectionHead, DINOLoss, update_momentum,
one backbone call per crop). stable-pretraining: its ``methods.DINO`` module as in its docs."""

from __future__ import annotations

import copy
import json
import sys

import timm
import torch
from common import make_views, summary, time_steps


def lightly_step(a: dict):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = timm.create_model(a["model"], num_classes=0, dynamic_img_size=True)
    dim = backbone.num_features
    s_head = DINOProjectionHead(dim, a["hidden"], a["bottleneck"], a["prototypes"], freeze_last_layer=0)
    t_backbone = copy.deepcopy(backbone)
    t_head = DINOProjectionHead(dim, a["hidden"], a["bottleneck"], a["prototypes"])  # as lightly's example
    deactivate_requires_grad(t_backbone)
    deactivate_requires_grad(t_head)
    mods = [m.to(a["device"]) for m in (backbone, s_head, t_backbone, t_head)]
    criterion = DINOLoss(output_dim=a["prototypes"]).to(a["device"])
    opt = torch.optim.AdamW(list(backbone.parameters()) + list(s_head.parameters()), lr=1e-4)
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    views = glob + loc

    def step():
        teacher_out = [t_head(t_backbone(v)) for v in glob]
        student_out = [s_head(backbone(v)) for v in views]
        loss = criterion(teacher_out, student_out, epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_momentum(mods[0], mods[2], m=0.996)
        update_momentum(mods[1], mods[3], m=0.996)

    return step


def spt_step(a: dict):
    import stable_pretraining as spt

    backbone = timm.create_model(a["model"], num_classes=0, dynamic_img_size=True)
    model = spt.methods.DINO(backbone, projector_hidden_dim=a["hidden"], projector_bottleneck_dim=a["bottleneck"],
                             n_prototypes=a["prototypes"]).to(a["device"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    wrappers = [m for m in model.modules() if hasattr(m, "update_teacher")]

    def step():
        out = model(global_views=glob, local_views=loc)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        for w in wrappers:
            w.update_teacher()

    return step


if __name__ == "__main__":
    name, a = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(a["threads"])
    step = {"lightly": lightly_step, "stable-pretraining": spt_step}[name](a)
    print(json.dumps(summary(time_steps(step, a["steps"], a["warmup"], a["device"]), a["batch"])))
