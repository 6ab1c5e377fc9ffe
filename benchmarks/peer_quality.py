"""The DINO recipe of dinokit's ``demo`` preset built from lightly's parts, run in the peers' venv.

    .bench-venv/bin/python benchmarks/peer_quality.py '{"data": ..., "weights": ..., "threads": 2}'

Called by ``quality.py``, which writes ``data`` (the training images dinokit reads, the resolved
recipe and multi-crop config) and scores the teacher backbone saved to ``weights`` with dinokit's
own evaluation. lightly provides the parts its DINO example uses: ``DINOProjectionHead``,
``DINOLoss`` (centre, teacher-temperature warm-up), ``update_momentum`` and ``cosine_schedule``
(teacher momentum). The rest is the same recipe as dinokit's DINO: the timm backbone, the teacher
head copied from the student's (as official DINO does), AdamW with no weight decay on biases and
1-D tensors, a linearly scaled LR with linear warm-up and cosine decay, a cosine weight decay,
per-parameter gradient clipping, the last layer frozen for the first epochs. The crops and the
data order are dinokit's own code (``multicrop.py`` and ``loader.py`` loaded as plain files, no
dinokit import), so both see the same pixels in the same order.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import timm
import torch
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src" / "dinokit"


def load_file(name: str, path: Path):
    """A dinokit source file as a standalone module (its imports are torch/torchvision/PIL only)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def warmup_cosine(step: int, peak: float, final: float, total: int, warmup: int) -> float:
    """np.linspace warm-up to ``peak`` then a cosine to ``final`` (DINO's ``cosine_scheduler``)."""
    if step < warmup:
        return peak * step / (warmup - 1) if warmup > 1 else 0.0
    n = total - warmup
    if step >= total or n <= 0:
        return final
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * (step - warmup) / n))


def main(a: dict) -> dict:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    torch.set_num_threads(a["threads"])
    blob = torch.load(a["data"], weights_only=False)
    images, r = blob["images"], blob["recipe"]
    multicrop = load_file("_dk_multicrop", SRC / "data" / "multicrop.py")
    loader_mod = load_file("_dk_loader", SRC / "train" / "loader.py")
    torch.manual_seed(r["seed"])  # dinokit's fit seeds everything with the run's seed

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return Image.fromarray(images[i, 0].numpy()), -1  # PIL 'L', as dinokit's dataset gives

    def collate(items):
        g = [torch.stack([v["global_views"][i] for v, _ in items]) for i in range(len(items[0][0]["global_views"]))]
        loc = [torch.stack([v["local_views"][i] for v, _ in items]) for i in range(len(items[0][0]["local_views"]))]
        return g, loc

    views = loader_mod.SeededViews(Images(), multicrop.MultiCropTransform(r["crops"]), seed=r["seed"])
    sampler = loader_mod.EpochSampler(len(views), seed=r["seed"])
    loader = torch.utils.data.DataLoader(views, batch_size=r["batch"], sampler=sampler, drop_last=True,
                                         collate_fn=collate, num_workers=0)
    per_epoch = len(loader)
    total = per_epoch * r["epochs"]
    if r["max_steps"] > 0:
        total = min(total, r["max_steps"])

    device = a.get("device", "cpu")
    backbone = timm.create_model(r["backbone"], num_classes=0, dynamic_img_size=True, **r["backbone_kwargs"])
    def make_head() -> DINOProjectionHead:
        return DINOProjectionHead(backbone.num_features, r["hidden"], r["bottleneck"], r["prototypes"],
                                  batch_norm=r["batch_norm"], freeze_last_layer=r["freeze_last_layer_epochs"],
                                  norm_last_layer=r["norm_last_layer"])

    head = make_head()
    # The teacher head is a copy of the student's; built anew and loaded, because deepcopy refuses
    # the weight-normalised last layer (its ``weight`` is not a leaf tensor under torch >= 2.x).
    t_backbone, t_head = copy.deepcopy(backbone), make_head()
    t_head.load_state_dict(head.state_dict())
    deactivate_requires_grad(t_backbone)
    deactivate_requires_grad(t_head)
    for m in (backbone, head, t_backbone, t_head):
        m.to(device)
    criterion = DINOLoss(output_dim=r["prototypes"], warmup_teacher_temp=r["warmup_teacher_temp"],
                         teacher_temp=r["teacher_temp"],
                         warmup_teacher_temp_epochs=r["warmup_teacher_temp_epochs"],
                         student_temp=r["student_temp"], center_momentum=r["center_momentum"]).to(device)
    named = [(n, p) for mod in (backbone, head) for n, p in mod.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not (n.endswith(".bias") or p.ndim == 1)]
    no_decay = [p for n, p in named if n.endswith(".bias") or p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0}], lr=0.0)
    scale = {"linear": r["batch"] / r["lr_reference_batch"], "sqrt": math.sqrt(r["batch"] / r["lr_reference_batch"]),
             "none": 1.0}[r["lr_scaling"]]
    peak = r["lr"] * scale
    warmup = min(round(r["warmup_epochs"] * per_epoch), total)
    params = [p for _, p in named]

    losses, step, epoch = [], 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    backbone.train(), head.train()
    while step < total:
        sampler.set_epoch(epoch)
        for glob, loc in loader:
            if step >= total:
                break
            lr = warmup_cosine(step, peak, min(r["min_lr"], peak), total, warmup)
            wd = warmup_cosine(step, r["weight_decay"], r["weight_decay_end"], total, 0)
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = lr, wd * g["wd_scale"]
            glob = [v.to(device) for v in glob]
            loc = [v.to(device) for v in loc]
            with torch.no_grad():
                teacher_out = [t_head(t_backbone(v)) for v in glob]
            student_out = [head(backbone(v)) for v in glob + loc]  # as lightly's example: one call per crop
            loss = criterion(teacher_out, student_out, epoch=epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if r["clip_grad"] > 0:
                for p in params:
                    if p.grad is not None:
                        norm = p.grad.norm()
                        p.grad.mul_((r["clip_grad"] / (norm + 1e-6)).clamp(max=1.0))
            head.cancel_last_layer_gradients(current_epoch=epoch)
            opt.step()
            m = cosine_schedule(step, total, r["ema_start"], r["ema_end"])
            update_momentum(backbone, t_backbone, m=m)
            update_momentum(head, t_head, m=m)
            losses.append(float(loss.detach()))
            step += 1
        epoch += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.save(t_backbone.cpu().state_dict(), a["weights"])
    tail = losses[-10:]
    vers = {}
    for pkg in ("lightly", "torch", "timm"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = "?"
    return {"final_loss": sum(tail) / len(tail) if tail else None, "steps": step, "train_wall_s": wall,
            "train_cpu_s": cpu, "versions": vers}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
