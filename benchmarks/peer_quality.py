"""One peer library's DINO, DINOv2 or DINOv3 trained on dinokit's data and recipe, in that peer's venv.

    .bench-venv-<lib>/bin/python benchmarks/peer_quality.py '{"peer": "spt-dinov2", "data": ...,
        "features": ..., "threads": 1, "device": "cpu"}'

Called by ``quality.py``, which writes ``data`` (the training images, each epoch's sample order and
per-sample augmentation seeds, the resolved recipe, the multi-crop config, and the preprocessed k-NN
bank and test images) and scores the teacher features this script writes to ``features`` with
dinokit's own evaluation. No dinokit import: the crops are dinokit's ``multicrop.py`` loaded as a
plain file (torch/torchvision/PIL only), applied under the same per-sample seeds in the same order
as dinokit's loader, so every library sees the same pixels.

The peers (``PEERS``), each with the parts its documentation writes:

- ``lightly-dino``: lightly's DINO example parts: ``DINOProjectionHead``, ``DINOLoss`` (EMA centre,
  teacher-temperature warm-up by epoch), ``update_momentum``; one backbone call per crop.
- ``lightly-dinov2``: lightly's DINOv2 example parts: ``MaskedVisionTransformerTIMM`` (its
  ``antialias=False``, ``pos_embed_initialization="skip"``), ``DINOv2ProjectionHead``, ``DINOLoss`` +
  ``IBOTPatchLoss`` (EMA centres: lightly has no Sinkhorn-Knopp) + ``KoLeoLoss`` on each global
  crop's student CLS token, block masks from ``random_block_mask``.
- ``spt-dino`` / ``spt-dinov2`` / ``spt-dinov3``: stable-pretraining's ``methods.DINO`` /
  ``DINOv2`` / ``DINOv3`` modules (their own heads: L2-normalised bottleneck and plain prototypes;
  Sinkhorn-Knopp for v2/v3; random masks at their ``mask_ratio``; v3's registers and KoLeo on the
  first global crop); teacher update through their ``TeacherStudentWrapper.update_teacher``.
- ``nidl-dino``: nidl's ``estimators.ssl.DINO`` driven without Lightning (``forward_student``,
  ``forward_teacher``, ``loss`` with the epoch, ``momentum_updater``).

Every constructor argument the recipe fixes (widths, prototypes, temperatures, EMA momenta, KoLeo
weight, registers, mask ratios where the peer takes them) comes from dinokit's resolved preset; the
training loop is the recipe's for all: AdamW with no weight decay on biases and 1-D tensors, linear
LR warm-up then cosine, cosine weight decay, cosine teacher momentum per step, gradient clipping in
the method's official form, the teacher temperature warm-up by epoch.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from torch import Tensor, nn

SRC = Path(__file__).resolve().parents[1] / "src" / "dinokit"


def load_file(name: str, path: Path) -> Any:
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


def teacher_temperature(r: dict, epoch: int) -> float:
    """Linear warm-up by epoch from ``warmup_teacher_temp`` to ``teacher_temp`` (DINO's linspace)."""
    n = int(r["warmup_teacher_temp_epochs"])
    if epoch >= n:
        return r["teacher_temp"]
    return r["warmup_teacher_temp"] + (r["teacher_temp"] - r["warmup_teacher_temp"]) * epoch / max(1, n - 1)


def timm_backbone(r: dict, registers: int = 0) -> nn.Module:
    """The recipe's timm backbone. The peers probe a new backbone with a 3-channel zero image; a
    pre-hook hands the patch embedding the backbone's own channels (a no-op on the real images)."""
    kw = dict(r["backbone_kwargs"])
    if registers:
        kw["reg_tokens"] = registers
    model = timm.create_model(r["backbone"], num_classes=0, dynamic_img_size=True, **kw)
    chans = int(kw.get("in_chans", 3))
    model.patch_embed.register_forward_pre_hook(lambda _m, args: (args[0][:, :chans], *args[1:]))
    return model


def decay_split(named: list[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): no weight decay on biases and 1-D tensors (DINO's rule)."""
    no = [p for n, p in named if n.endswith(".bias") or p.ndim == 1]
    ids = {id(p) for p in no}
    return [p for _, p in named if id(p) not in ids], no


@dataclass
class Peer:
    """One library's method: what the shared training loop needs from it."""

    groups: list[list[tuple[str, nn.Parameter]]]  # trained parameters by module (for clipping)
    loss: Callable[[list[Tensor], list[Tensor], int], Tensor]  # (global crops, local crops, epoch)
    ema: Callable[[float], None]  # teacher update with this momentum
    embed: Callable[[Tensor], Tensor]  # teacher CLS features of preprocessed images
    last_layer: list[nn.Parameter] = field(default_factory=list)  # frozen for the first epochs
    train: Callable[[bool], None] = lambda mode: None
    modules: list[nn.Module] = field(default_factory=list)  # everything with weights or buffers

    def to(self, device: str) -> None:
        for m in self.modules:
            m.to(device)


def named(*modules: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]


def lightly_dino(r: dict) -> Peer:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = timm_backbone(r)

    def make_head() -> DINOProjectionHead:
        return DINOProjectionHead(backbone.num_features, r["hidden"], r["bottleneck"], r["prototypes"],
                                  batch_norm=r["batch_norm"], norm_last_layer=r["norm_last_layer"])

    head = make_head()
    # The teacher head is a copy of the student's; built anew and loaded, because deepcopy refuses
    # the weight-normalised last layer (its ``weight`` is not a leaf tensor under torch >= 2.x).
    t_backbone, t_head = copy.deepcopy(backbone), make_head()
    t_head.load_state_dict(head.state_dict())
    deactivate_requires_grad(t_backbone)
    deactivate_requires_grad(t_head)
    criterion = DINOLoss(output_dim=r["prototypes"], warmup_teacher_temp=r["warmup_teacher_temp"],
                         teacher_temp=r["teacher_temp"],
                         warmup_teacher_temp_epochs=int(r["warmup_teacher_temp_epochs"]),
                         student_temp=r["student_temp"], center_momentum=r["center_momentum"])

    def loss(glob: list[Tensor], loc: list[Tensor], epoch: int) -> Tensor:
        with torch.no_grad():
            teacher_out = [t_head(t_backbone(v)) for v in glob]
        student_out = [head(backbone(v)) for v in glob + loc]  # as lightly's example: one call per crop
        return criterion(teacher_out, student_out, epoch=epoch)

    def ema(m: float) -> None:
        update_momentum(backbone, t_backbone, m=m)
        update_momentum(head, t_head, m=m)

    def train(mode: bool) -> None:
        backbone.train(mode), head.train(mode)

    return Peer([named(backbone), named(head)], loss, ema, lambda x: t_backbone(x),
                [p for p in head.last_layer.parameters() if p.requires_grad], train,
                [backbone, head, t_backbone, t_head, criterion])


def lightly_dinov2(r: dict, vit_init: str = "") -> Peer:
    """``vit_init``: lightly's own ViT initialisation (``""``: xavier-uniform linear layers and patch
    embedding) or ``"skip"`` (timm's, as dinokit's backbone: a controlled trial)."""
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import random_block_mask, update_momentum

    student = MaskedVisionTransformerTIMM(vit=timm_backbone(r), antialias=False, pos_embed_initialization="skip",
                                          weight_initialization=vit_init)
    teacher = copy.deepcopy(student)
    dim = student.vit.embed_dim

    def make_head(k: int) -> DINOv2ProjectionHead:
        return DINOv2ProjectionHead(dim, r["hidden"], r["bottleneck"], k, batch_norm=r["batch_norm"])

    s_dino = make_head(r["prototypes"])
    s_ibot = s_dino if r["ibot_shared_head"] else make_head(r["ibot_prototypes"])
    t_dino = make_head(r["prototypes"])
    t_dino.load_state_dict(s_dino.state_dict())
    t_ibot = t_dino if r["ibot_shared_head"] else make_head(r["ibot_prototypes"])
    t_ibot.load_state_dict(s_ibot.state_dict())
    for m in (teacher, t_dino, t_ibot):
        m.requires_grad_(False)
        m.eval()
    dino_loss = DINOLoss(output_dim=r["prototypes"], warmup_teacher_temp=r["warmup_teacher_temp"],
                         teacher_temp=r["teacher_temp"], student_temp=r["student_temp"],
                         center_momentum=r["center_momentum"])
    ibot_loss = IBOTPatchLoss(output_dim=r["ibot_prototypes"], teacher_temp=r["teacher_temp"],
                              student_temp=r["ibot_student_temp"], center_momentum=r["center_momentum"])
    koleo = KoLeoLoss()
    patch = student.vit.patch_embed.patch_size[0]
    lo, hi = r["mask_ratio_range"]

    def loss(glob: list[Tensor], loc: list[Tensor], epoch: int) -> Tensor:
        g, n_g = torch.cat(glob), len(glob)
        b, h, w = len(g), g.shape[-2] // patch, g.shape[-1] // patch
        block = random_block_mask(size=(b, h, w), batch_mask_ratio=r["mask_probability"],
                                  min_image_mask_ratio=lo, max_image_mask_ratio=hi, device=g.device)
        mask = g.new_zeros((b, student.vit.num_prefix_tokens + h * w), dtype=torch.bool)
        mask[:, student.vit.num_prefix_tokens:] = block.flatten(1)
        temp = teacher_temperature(r, epoch)
        with torch.no_grad():
            t_tok = teacher.encode(g)
            t_cls = t_dino(t_tok[:, 0])
            t_patch = t_ibot(t_tok[mask])
        s_tok = student.encode(g, mask=mask)
        s_cls_g = s_tok[:, 0]
        s_cls_l = student.encode(torch.cat(loc))[:, 0] if loc else s_cls_g[:0]
        s_cls = s_dino(torch.cat([s_cls_g, s_cls_l]))
        total = r["dino_weight"] * dino_loss(list(t_cls.chunk(n_g)), list(s_cls.chunk(n_g + len(loc))),
                                             teacher_temp=temp)
        total = total + r["ibot_weight"] * ibot_loss(t_patch, s_ibot(s_tok[mask]), mask=block, teacher_temp=temp)
        return total + r["koleo_weight"] * sum(koleo(c) for c in s_cls_g.chunk(n_g))

    def ema(m: float) -> None:
        for s, t in ((student, teacher), (s_dino, t_dino), (s_ibot, t_ibot)):
            update_momentum(s, t, m=m)

    def train(mode: bool) -> None:
        for m in (student, s_dino, s_ibot):
            m.train(mode)

    heads = [s_dino] if r["ibot_shared_head"] else [s_dino, s_ibot]
    last = [p for h in heads for p in h.last_layer.parameters() if p.requires_grad]
    return Peer([named(student), *[named(h) for h in heads]], loss, ema, lambda x: teacher.encode(x)[:, 0],
                last, train, [student, s_dino, s_ibot, teacher, t_dino, t_ibot, dino_loss, ibot_loss])


def spt(r: dict, method: str) -> Peer:
    import stable_pretraining as spt_lib

    common = {"projector_hidden_dim": r["hidden"], "projector_bottleneck_dim": r["bottleneck"],
              "temperature_student": r["student_temp"], "ema_decay_start": r["ema_start"],
              "ema_decay_end": r["ema_end"]}
    if method == "dino":
        model = spt_lib.methods.DINO(timm_backbone(r), n_prototypes=r["prototypes"],
                                     temperature_teacher_warmup=r["warmup_teacher_temp"],
                                     temperature_teacher=r["teacher_temp"],
                                     warmup_epochs_temperature_teacher=int(r["warmup_teacher_temp_epochs"]),
                                     center_momentum=r["center_momentum"], **common)
        heads = [model.projector.student]
    else:
        kw = {**common, "n_cls_prototypes": r["prototypes"], "n_patch_prototypes": r["ibot_prototypes"],
              "temperature_teacher": r["teacher_temp"], "patch_loss_weight": r["ibot_weight"],
              "image_size": r["crops"]["global_size"]}
        if method == "dinov3":
            kw.update(n_register_tokens=r["n_registers"], koleo_weight=r["koleo_weight"])
        model = getattr(spt_lib.methods, {"dinov2": "DINOv2", "dinov3": "DINOv3"}[method])(timm_backbone(r), **kw)
        heads = [model.cls_head.student, model.patch_head.student]
    wrappers = [m for m in model.modules() if hasattr(m, "update_teacher")]
    inner = {id(p) for m in [model.backbone.student, *heads] for p in m.parameters()}
    rest = [(n, p) for n, p in named(model) if id(p) not in inner]  # mask token, registers

    def loss(glob: list[Tensor], loc: list[Tensor], epoch: int) -> Tensor:
        return model(global_views=glob, local_views=loc).loss

    def ema(m: float) -> None:
        for w in wrappers:
            w.ema_coefficient.fill_(m)
            w.update_teacher()

    def embed(x: Tensor) -> Tensor:
        return model(images=x).embedding

    last = [heads[0][-1].weight] + ([heads[1][-1].weight] if len(heads) > 1 else [])
    return Peer([named(model.backbone.student), *[named(h) for h in heads], rest], loss, ema, embed, last,
                model.train, [model])


def nidl_dino(r: dict) -> Peer:
    from nidl.estimators.ssl.dino import DINO

    backbone = timm_backbone(r)
    model = DINO(backbone, proj_input_dim=backbone.num_features, proj_hidden_dim=r["hidden"],
                 proj_bottleneck_dim=r["bottleneck"], proj_output_dim=r["prototypes"],
                 proj_batch_norm=r["batch_norm"], proj_norm_last_layer=r["norm_last_layer"],
                 num_local_crops=r["crops"]["n_local"], student_temperature=r["student_temp"],
                 teacher_temperature=r["teacher_temp"], warmup_teacher_temp=r["warmup_teacher_temp"],
                 warmup_teacher_temp_epochs=int(r["warmup_teacher_temp_epochs"]), base_lambda=r["ema_start"],
                 final_lambda=r["ema_end"])

    def loss(glob: list[Tensor], loc: list[Tensor], epoch: int) -> Tensor:
        views = glob + loc
        return model.loss(model.forward_teacher(views), model.forward_student(views), epoch=epoch)

    def ema(m: float) -> None:
        model.momentum_updater.cur_lambda = m
        model.momentum_updater.update(model.student, model.teacher)
        model.momentum_updater.update(model.student_head, model.teacher_head)

    last = [p for p in model.student_head.last_layer.parameters() if p.requires_grad]
    return Peer([named(model.student), named(model.student_head)], loss, ema, lambda x: model.teacher(x), last,
                model.train, [model])


PEERS: dict[str, Callable[[dict], Peer]] = {
    "lightly-dino": lightly_dino, "lightly-dinov2": lightly_dinov2,
    "lightly-dinov2-timm-init": lambda r: lightly_dinov2(r, vit_init="skip"),
    "spt-dino": lambda r: spt(r, "dino"), "spt-dinov2": lambda r: spt(r, "dinov2"),
    "spt-dinov3": lambda r: spt(r, "dinov3"), "nidl-dino": nidl_dino,
}


def batches(blob: dict, crops: Any, batch: int, epoch: int) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Epoch ``epoch`` as dinokit's loader gives it: its sample order, each sample's crops drawn
    under its own seed, the ragged tail dropped."""
    images, order, seeds = blob["images"], blob["order"][epoch], blob["seeds"][epoch]
    for start in range(0, len(order) - batch + 1, batch):
        views = []
        for i in order[start:start + batch].tolist():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seeds[i]))
                views.append(crops(Image.fromarray(images[i, 0].numpy())))
        n_g, n_l = len(views[0]["global_views"]), len(views[0]["local_views"])
        yield ([torch.stack([v["global_views"][k] for v in views]) for k in range(n_g)],
               [torch.stack([v["local_views"][k] for v in views]) for k in range(n_l)])


def clip(peer: Peer, mode: str, max_norm: float) -> None:
    """Gradient clipping in the recipe's form: per tensor (DINO), per module (DINOv2/v3), or global."""
    if max_norm <= 0 or mode == "none":
        return
    groups = peer.groups if mode == "per_module" else [[np for g in peer.groups for np in g]]
    for g in groups:
        params = [p for _, p in g if p.grad is not None]
        if mode == "per_param":
            for p in params:
                p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        elif params:
            torch.nn.utils.clip_grad_norm_(params, max_norm)


def main(a: dict) -> dict:
    torch.set_num_threads(a["threads"])
    blob = torch.load(a["data"], weights_only=True)
    r = blob["recipe"]
    multicrop = load_file("_dk_multicrop", SRC / "data" / "multicrop.py")
    crops = multicrop.MultiCropTransform(r["crops"])
    torch.manual_seed(r["seed"])  # dinokit's fit seeds everything with the run's seed
    peer = PEERS[a["peer"]](r)
    device = {"gpu": "cuda"}.get(a.get("device", "cpu"), a.get("device", "cpu"))  # Lightning's name -> torch's
    peer.to(device)
    per_epoch = len(blob["order"][0]) // r["batch"]
    total = per_epoch * r["epochs"] if r["max_steps"] <= 0 else min(per_epoch * r["epochs"], r["max_steps"])

    everything = [np for g in peer.groups for np in g]
    decay, no_decay = decay_split(everything)
    opt = torch.optim.AdamW([{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0}],
                            lr=0.0, betas=tuple(r["betas"]))
    scale = {"linear": r["batch"] / r["lr_reference_batch"], "sqrt": math.sqrt(r["batch"] / r["lr_reference_batch"]),
             "none": 1.0}[r["lr_scaling"]]
    peak = r["lr"] * scale
    warmup = min(round(r["warmup_epochs"] * per_epoch), total)
    freeze = round(r["freeze_last_layer_epochs"] * per_epoch)

    losses, step, epoch = [], 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    peer.train(True)
    while step < total:
        for glob, loc in batches(blob, crops, r["batch"], epoch % len(blob["order"])):
            if step >= total:
                break
            lr = warmup_cosine(step, peak, min(r["min_lr"], peak), total, warmup)
            wd = warmup_cosine(step, r["weight_decay"], r["weight_decay_end"], total, 0)
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = lr, wd * g["wd_scale"]
            loss = peer.loss([v.to(device) for v in glob], [v.to(device) for v in loc], epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip(peer, r["clip_mode"], r["clip_grad"])
            if step < freeze:
                for p in peer.last_layer:
                    p.grad = None
            opt.step()
            peer.ema(warmup_cosine(step, r["ema_start"], r["ema_end"], total, 0))
            losses.append(float(loss.detach()))
            step += 1
        epoch += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    peer.train(False)
    with torch.no_grad():
        feats = {k: torch.cat([peer.embed(x.to(device)).float().cpu() for x in blob[k].split(256)])
                 for k in ("bank", "test")}
    tmp = f"{a['features']}.tmp{os.getpid()}"
    torch.save(feats, tmp)
    os.replace(tmp, a["features"])
    tail = losses[-10:]
    return {"final_loss": sum(tail) / len(tail) if tail else None, "steps": step, "train_wall_s": wall,
            "train_cpu_s": cpu}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
