"""Distillation: small students learn from a large frozen teacher (method ``distill``).

The teacher (eval mode, no gradient, no EMA; bf16 autocast on a CUDA GPU) runs once per batch on
the global crops; every student reads that one forward. Two objectives, chosen by what the
teacher brings (``distillation.objective=auto``):

* **DINOv3-style** (a teacher with its DINO and iBOT heads: a dinokit run): as DINOv3's
  multi-distillation (``dinov3/train/multidist_meta_arch.py``), each student's own heads learn the
  teacher's Sinkhorn-Knopp-centred CLS distribution on the global crops (from its global and local
  crops: :class:`~dinokit.methods.terms.DINOClsTerm`) and its centred patch distributions at the
  iBOT mask positions (:class:`~dinokit.methods.terms.IBOTPatchTerm`; the student's crops are not
  masked, as the official distillation), plus KoLeo on the student's CLS features. The student
  heads have the teacher's prototype counts.
* **Feature distillation** (a backbone-only teacher: published DINOv2/DINOv3 weights, an export):
  the student's CLS and patch features, through small projectors, match the teacher's
  (:class:`~dinokit.methods.terms.FeatureDistillTerm`).

A student of any backbone family works (timm ViTs, timm/torchvision CNNs, any ``nn.Module``):
when its patch grid differs from the teacher's (a CNN's feature map, another patch size) it is
resampled to the teacher's (:func:`~dinokit.losses.gram.resample_patch_grid`) before both
objectives.

Several students (``model.students``) train together in one optimiser, each network its own
parameter groups (with its ``lr_mult``), its own clipping and its own export. Each student is
initialised from its own seed (the run's seed and its name), so a student trained among others
equals that student trained alone on the same data (without stochastic depth, whose draws share
the global generator).

Example::

    teacher = dinokit.DINOv3("vit_small_patch16_224")       # or a path to a run or weights file
    model = dinokit.Distillation(teacher, "resnet18")
    out = model(global_views=[g1, g2], local_views=locals_)
    out.loss.backward()
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dinokit.backbones import Backbone, BackboneOutput
from dinokit.backbones.base import cls_embedding
from dinokit.clock import ManualTime, StepValues, TermTiming, frozen_prefixes
from dinokit.losses.centering import EMACenter
from dinokit.losses.gram import resample_patch_grid
from dinokit.methods.base import MethodOutput, SelfDistillationMethod, check_views, forward_views
from dinokit.methods.composed import indices_from_masks, random_mask_indices
from dinokit.methods.dinov2 import dinov2_terms
from dinokit.methods.registry import (
    DINOV2_TRAINING,
    make_backbone,
    method_spec,
    register_method,
    resolve_settings,
)
from dinokit.methods.teacher_file import TeacherSource, read_teacher
from dinokit.methods.terms import DINOClsTerm, IBOTPatchTerm, LossTerm, StepFeatures
from dinokit.methods.terms.feature_distill import FeatureDistillTerm
from dinokit.settings import BackboneSettings, MethodSettings
from dinokit.weights import fingerprint

__all__ = ["DEFAULT_STUDENT", "DistillOutput", "Distillation", "distill", "feature_grid",
           "student_backbone_settings"]

#: The name of the one student when ``model.students`` is empty.
DEFAULT_STUDENT = "student"
OBJECTIVES = ("auto", "dinov3", "features")


@dataclass
class DistillOutput(MethodOutput):
    """Output of :class:`Distillation`: ``loss`` (every student's weighted terms, summed),
    ``embedding`` (the first student's CLS features, detached), ``losses`` (each term's loss,
    ``loss_<term>`` for one student, ``loss_<student>_<term>`` for several), the teacher
    temperature of the step, and the first student's diagnostics: its CLS cosine to the teacher
    (feature objective), its and the teacher's CLS logits and the teacher entropy (DINOv3-style)."""

    teacher_temperature: float | None = None
    cls_cosine: Tensor | None = None
    student_logits: Tensor | None = None
    teacher_logits: Tensor | None = None
    teacher_entropy: Tensor | None = None


def student_backbone_settings(settings: MethodSettings, name: str | None = None) -> BackboneSettings:
    """The backbone settings of student ``name`` (the run's ``backbone`` section with the
    student's overrides; the first student when ``name`` is None)."""
    students = settings.model.students
    if not students:
        if name not in (None, DEFAULT_STUDENT):
            raise KeyError(f"no student named {name!r}; the run has one, {DEFAULT_STUDENT!r}")
        return settings.backbone
    entry = students[0] if name is None else next((s for s in students if s["name"] == name), None)
    if entry is None:
        raise KeyError(f"no student named {name!r}; students: {[s['name'] for s in students]}")
    return dataclasses.replace(settings.backbone, **dict(entry.get("backbone") or {}))


def feature_grid(backbone: Backbone, n_patches: int, height: int, width: int) -> tuple[int, int]:
    """The ``(rows, cols)`` of a backbone's ``n_patches`` on an ``height x width`` input: its own
    ``grid_size``, or for a module that does not know it, the grid of the input's aspect ratio."""
    try:
        grid = tuple(backbone.grid_size(height, width))
    except TypeError:
        grid = ()
    if len(grid) == 2 and grid[0] * grid[1] == n_patches:
        return int(grid[0]), int(grid[1])
    rows = max(1, round(math.sqrt(n_patches * height / width)))
    if n_patches % rows:
        raise ValueError(f"{type(backbone).__name__} gives {n_patches} patches on a {height}x{width} input: "
                         "no grid of that aspect ratio")
    return rows, n_patches // rows


class Distillation(SelfDistillationMethod):
    """A frozen teacher and one or more students (see the module docstring).

    Args:
        teacher: the teacher: a path (dinokit run or checkpoint, export, timm/Meta weights), a
            method (its teacher), an ``nn.ModuleDict`` with ``backbone`` (and heads) or a backbone
            module [``model.teacher``].
        student: the student backbone when ``settings.model.students`` is empty: a timm name,
            ``"torchvision/<name>"``, an ``nn.Module`` or a :class:`Backbone`; None = the
            ``backbone`` section [``backbone.name``].
        settings: :class:`~dinokit.settings.MethodSettings`: ``distillation`` (objective, feature
            loss and projectors), ``model.students`` (several students), ``dino``/``ibot``/
            ``koleo``/``heads``/``teacher`` for the DINOv3-style objective, ``backbone``.
    """

    method_name = "distill"

    def __init__(self, teacher: TeacherSource, student: str | nn.Module | None = None, *,
                 settings: MethodSettings | None = None):
        nn.Module.__init__(self)
        spec = method_spec(self.method_name)
        s = resolve_settings(spec, settings or MethodSettings())
        if isinstance(student, str):
            s = dataclasses.replace(s, backbone=dataclasses.replace(s.backbone, name=student))
        d = s.distillation
        if d.objective not in OBJECTIVES:
            raise ValueError(f"distillation.objective must be one of {OBJECTIVES}, got {d.objective!r}")
        self.teacher = read_teacher(teacher, d)
        self.teacher_fingerprint = fingerprint(self.teacher)
        self.checkpoint_external = d.checkpoint_teacher
        t_bb: Backbone = self.teacher["backbone"]
        has_heads = "head" in self.teacher
        objective = ("dinov3" if has_heads else "features") if d.objective == "auto" else d.objective
        if objective == "dinov3" and not has_heads:
            raise ValueError("distillation.objective=dinov3 needs a teacher with its DINO head (a dinokit "
                             "run or checkpoint); this teacher is a backbone only: use objective=features")
        self.objective = objective
        if objective == "dinov3":
            s = self._settings_from_teacher_heads(s)
        self.settings = s
        self.teacher_settings = s.teacher
        self.temperature_endpoint = spec.temperature_endpoint
        self.time = ManualTime(s.teacher, spec.temperature_endpoint)
        self.rules = dict(spec.training)
        self.check_finite = True
        self._frozen: tuple[str, ...] = ()
        self.mask_ratio = 0.3

        base_seed = int(torch.randint(0, 2**62, ()).item())  # one draw: a student's init ignores the others
        entries = s.model.students or [{"name": DEFAULT_STUDENT, "backbone": {}, "lr_mult": 1.0}]
        self.students = nn.ModuleDict()
        self.student_terms = nn.ModuleDict()
        self.lr_mults: dict[str, float] = {}
        for e in entries:
            name = e["name"]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base_seed + zlib.crc32(name.encode()))
                given = student if not s.model.students and not isinstance(student, str) else None
                b = student_backbone_settings(s, name if s.model.students else None)
                backbone = make_backbone(spec, b, given)
                terms = self._make_terms(s, t_bb.embed_dim)
                self._check_student(name, backbone, terms)
                heads: dict[str, nn.Module] = {}
                for t in terms:
                    heads.update(t.make_heads(backbone.embed_dim))
            self.students[name] = nn.ModuleDict({"backbone": backbone, **heads})
            self.student_terms[name] = nn.ModuleList(terms)
            self.lr_mults[name] = float(e.get("lr_mult", 1.0))

    def external_networks(self) -> dict[str, str]:
        """The frozen teacher: an input of the run (``model.teacher``), not its state."""
        return {"teacher": self.teacher_fingerprint}

    # ----------------------------------------------------------------- construction
    def _settings_from_teacher_heads(self, s: MethodSettings) -> MethodSettings:
        """The student heads get the teacher's prototype counts; the iBOT term runs when the
        teacher has a patch head."""
        k_cls = int(self.teacher["head"].out_dim)
        has_patch = "patch_head" in self.teacher
        ibot = dataclasses.replace(s.ibot, shared_head=False,
                                   n_prototypes=int(self.teacher["patch_head"].out_dim) if has_patch
                                   else s.ibot.n_prototypes, weight=s.ibot.weight if has_patch else 0.0)
        return dataclasses.replace(s, dino=dataclasses.replace(s.dino, n_prototypes=k_cls), ibot=ibot)

    def _make_terms(self, s: MethodSettings, teacher_dim: int) -> list[LossTerm]:
        if self.objective == "features":
            return [FeatureDistillTerm(s.distillation, teacher_dim=teacher_dim)]
        return dinov2_terms(s)  # the teacher's targets, learned as DINOv2's terms learn them

    def _check_student(self, name: str, backbone: Backbone, terms: Sequence[LossTerm]) -> None:
        t_bb = self.teacher["backbone"]
        needs_patches = any(isinstance(t, IBOTPatchTerm) or getattr(t, "uses_patches", False) for t in terms)
        if needs_patches and not t_bb.has_patch_tokens:
            raise TypeError(f"the teacher ({type(t_bb).__name__}) has no patch tokens: set "
                            "distillation.patch_weight=0 (CLS only)")
        if needs_patches and not backbone.has_patch_tokens:
            raise TypeError(f"student {name!r} ({type(backbone).__name__}) has no patch tokens or feature "
                            "map: set distillation.patch_weight=0 (CLS only)")
        if backbone.in_chans is not None and t_bb.in_chans is not None and backbone.in_chans != t_bb.in_chans:
            raise ValueError(f"student {name!r} reads {backbone.in_chans} channels, the teacher "
                             f"{t_bb.in_chans}: set backbone.kwargs.in_chans={t_bb.in_chans}")

    # ----------------------------------------------------------------- structure
    @property
    def student(self) -> nn.ModuleDict:  # type: ignore[override]
        """The first student (backbone + its heads or projectors)."""
        return next(iter(self.students.values()))

    @property
    def student_backbone(self) -> Backbone:
        return self.student["backbone"]

    @property
    def deployed_backbone(self) -> Backbone:
        """What a distillation delivers: the (first) student."""
        return self.student_backbone

    @property
    def head_names(self) -> list[str]:
        return [k for k in self.student if k != "backbone"]

    @property
    def mask_patch_size(self) -> int | None:
        """The iBOT masks lie on the teacher's patch grid."""
        return self.teacher["backbone"].patch_size

    @property
    def needs_masks(self) -> bool:
        return any(isinstance(t, IBOTPatchTerm) for t in self.student_terms[next(iter(self.students))])

    def trained_networks(self) -> dict[str, tuple[nn.ModuleDict, float]]:
        return {name: (net, self.lr_mults[name]) for name, net in self.students.items()}

    def term_timings(self) -> dict[str, TermTiming]:
        first = self.student_terms[next(iter(self.students))]
        return {t.section: t.timing() for t in first}

    # ----------------------------------------------------------------- the hooks of a training step
    @torch.no_grad()
    def after_optimizer_step(self, momentum: float, step: int, apply: Tensor | None = None,
                             micro_batches: int = 1) -> None:
        """No EMA: the teacher is frozen. EMA centres (``teacher.centering=ema``) are committed."""
        for m in self.modules():
            if isinstance(m, EMACenter):
                m.commit(micro_batches, apply=apply)

    def freeze(self, parts: Sequence[str]) -> None:
        """Keep ``parts`` of every student fixed (a stage's ``frozen``); the teacher is frozen anyway."""
        prefixes = frozen_prefixes(parts, self.head_names)
        if prefixes != self._frozen:
            self._frozen = prefixes
            self.train(self.training)

    def drop_frozen_gradients(self) -> None:
        if not self._frozen:
            return
        for net in self.students.values():
            for name, p in net.named_parameters():
                if name.startswith(self._frozen):
                    p.grad = None

    def train(self, mode: bool = True) -> Distillation:
        nn.Module.train(self, mode)
        self.teacher.eval()
        if mode and self._frozen:
            for net in self.students.values():
                for name, m in net.named_modules():
                    if name and f"{name}.".startswith(self._frozen):
                        m.eval()
        return self

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for net in self.students.values() for p in net.parameters() if p.requires_grad]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for net in self.students.values():
            for m in net.values():
                if hasattr(m, "last_layer_parameters"):
                    out.extend(m.last_layer_parameters())
        return out

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """The first student's CLS embedding ``[B, D]`` without gradient."""
        self.student_backbone.check_input(images, "images")
        return cls_embedding(self.student_backbone, images)

    # ----------------------------------------------------------------- forward
    @torch.no_grad()
    def teacher_features(self, views: Sequence[Tensor]) -> BackboneOutput:
        """The teacher's output on the global crops (one pass per resolution run; bf16 autocast on
        a CUDA GPU, whatever the run's precision)."""
        bb = self.teacher["backbone"]
        device = views[0].device
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16)
               if device.type == "cuda" and torch.cuda.is_bf16_supported() else contextlib.nullcontext())
        with ctx:
            outs = forward_views(bb, views)
        cls = torch.cat([o.cls for o in outs]).float()
        has_patches = all(o.patches is not None for o in outs)
        patches = torch.cat([o.patches for o in outs]).float() if has_patches else None
        return BackboneOutput(cls=cls, patches=patches)

    def forward(self, global_views: Sequence[Tensor] | None = None,
                local_views: Sequence[Tensor] | None = None, images: Tensor | None = None,
                masks: Tensor | None = None, mask_indices: Tensor | None = None,
                mask_weights: Tensor | None = None, values: StepValues | None = None,
                **_: Any) -> DistillOutput:
        """Training step on multi-crop views (as :meth:`ComposedMethod.forward
        <dinokit.methods.composed.ComposedMethod.forward>`; ``masks`` lie on the teacher's patch
        grid), or the first student's CLS embedding of ``images``."""
        if images is not None:
            emb = self.embed(images)
            return DistillOutput(loss=emb.new_zeros(()), embedding=emb)
        g, lv = check_views(global_views, local_views, self.student_backbone.in_chans)
        if values is not None:
            step, temp, weights = values.step, float(values.teacher_temperature), values.weights
        else:
            step, temp = self.time.step, float(self.teacher_temperature)
            weights = {sec: t.at(step) for sec, t in self.term_timings().items()}
        sizes = {tuple(v.shape[-2:]) for v in g}
        if len(sizes) != 1:
            raise ValueError(f"distillation needs global views of one size, got {sorted(sizes)}")
        n_g, b = len(g), g[0].shape[0]
        t_out = self.teacher_features(g)
        t_grid = self.teacher["backbone"].grid_size(*g[0].shape[-2:]) if t_out.patches is not None else None
        m = idx = wts = None
        if self.needs_masks:
            m, idx, wts = self._masks(masks, mask_indices, mask_weights, n_g * b, t_grid[0] * t_grid[1],
                                      g[0].device)
        total: Tensor | None = None
        losses: dict[str, Tensor] = {}
        extra: dict[str, Any] = {}
        several = len(self.students) > 1
        for k, (name, net) in enumerate(self.students.items()):
            active = [(t, float(weights.get(t.section, 0.0))) for t in self.student_terms[name]]
            active = [(t, w) for t, w in active if w > 0.0]
            if not active:
                continue
            wants_local = any(isinstance(t, DINOClsTerm) for t, _ in active) and bool(lv)
            s_global, s_local = self._student_features(net["backbone"], g, lv if wants_local else [], t_grid)
            f = StepFeatures(n_global=n_g, batch_size=b, teacher_temperature=temp, step=step,
                             training=self.training, student_global=s_global, student_local_cls=s_local,
                             teacher_global=t_out, masks=m, mask_indices=idx, mask_weights=wts)
            for t, w in active:
                r = t(f, net, self.teacher)
                total = w * r.loss if total is None else total + w * r.loss
                losses[f"loss_{name}_{t.name}" if several else f"loss_{t.name}"] = r.loss.detach()
                if k == 0:  # the first student's diagnostics
                    extra.update({f: r.outputs[f] for f in ("cls_cosine", "student_logits", "teacher_logits",
                                                            "teacher_entropy") if f in r.outputs})
        if total is None:  # every term weighs 0 at this step
            total = self.student_parameters()[0].sum() * 0.0
        if self.check_finite:
            self._check_finite("loss", total)
        emb = t_out.cls.detach()
        return DistillOutput(loss=total, embedding=emb, losses=losses, teacher_temperature=temp, **extra)

    def _student_features(self, backbone: Backbone, g: list[Tensor], lv: list[Tensor],
                          t_grid: tuple[int, int] | None) -> tuple[BackboneOutput, Tensor | None]:
        """The student's global-crop output (its patches on the teacher's grid) and the CLS
        features of the local crops (None without them). The global crops share one size, so
        they are the first resolution run."""
        outs = forward_views(backbone, g + lv, breaks=(len(g),))
        s_global = outs[0]
        s_local = torch.cat([o.cls for o in outs[1:]]) if lv else None
        patches = s_global.patches
        if patches is not None and t_grid is not None:
            s_grid = feature_grid(backbone, patches.shape[1], *g[0].shape[-2:])
            if tuple(s_grid) != tuple(t_grid):
                patches = resample_patch_grid(patches, s_grid, t_grid,
                                              mode=self.settings.distillation.resample_mode)
        return BackboneOutput(cls=s_global.cls, patches=patches), s_local

    def _masks(self, masks: Tensor | None, mask_indices: Tensor | None, mask_weights: Tensor | None,
               n_rows: int, n_patches: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
        if masks is None:
            return random_mask_indices(n_rows, n_patches, self.mask_ratio, device)
        if masks.dtype != torch.bool or tuple(masks.shape) != (n_rows, n_patches):
            raise ValueError(f"masks must be bool [n_global * B, N] on the teacher's grid = [{n_rows}, "
                             f"{n_patches}], got {masks.dtype} {tuple(masks.shape)}")
        if mask_indices is None or mask_weights is None:
            return (masks, *indices_from_masks(masks))
        return masks, mask_indices, mask_weights


@register_method(
    "distill", sections=("dino", "ibot", "koleo", "distillation"),
    official={"teacher.momentum": 1.0, "teacher.warmup_unit": "step", "teacher.centering": "sinkhorn",
              "heads.norm_last_layer": False, "heads.weight_norm": False, "ibot.shared_head": False,
              "backbone.n_registers": 0},
    training={"no_decay_rule": "dinov3", **DINOV2_TRAINING},
    summary="distillation from a frozen teacher (model.teacher) into one or more students",
    deploys="student",
)
def distill(backbone: Backbone, settings: MethodSettings) -> Distillation:
    """Distillation from its settings: the teacher from ``model.teacher``, the students from
    ``model.students`` (or ``backbone``), the objective from ``distillation``."""
    if not settings.model.teacher:
        raise ValueError("model.teacher: method=distill needs the teacher: a dinokit run, an export or a "
                         "weights file (model.teacher=<path>)")
    return Distillation(settings.model.teacher, None if settings.model.students else backbone,
                        settings=settings)

