"""A method as a composition: one backbone, the heads its loss terms declare, and the terms.

The forward pass computes each feature once, and only the features the active terms consume:
the teacher on the unmasked global crops (no grad), the student on the global crops (with the
iBOT mask token where masked) and on the local crops (one sequence-packed pass over every crop, or
one batched pass per resolution: the backbone's ``packed_crops``), the masked tokens gathered at
static-size indices. Each term turns those into a loss; the total is the weighted sum. DINO,
DINOv2, DINOv3 and iBOT are presets of this class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dinokit.backbones import Backbone, BackboneOutput
from dinokit.clock import Stage, StepValues, TermTiming
from dinokit.methods.base import (
    MethodOutput,
    SelfDistillationMethod,
    check_views,
    forward_views,
    resolution_groups,
)
from dinokit.methods.outputs import DINOv2Output
from dinokit.methods.terms.base import (
    LOCAL_CLS,
    MASKED_PATCHES,
    STUDENT_PATCHES,
    TEACHER_GLOBAL,
    LossTerm,
    StepFeatures,
)
from dinokit.settings import TeacherSettings


def _merge(outs: list[BackboneOutput]) -> BackboneOutput:
    if len(outs) == 1:
        return outs[0]
    patches = [o.patches for o in outs]
    same = all(p is not None for p in patches) and len({tuple(p.shape[1:]) for p in patches}) == 1
    return BackboneOutput(cls=torch.cat([o.cls for o in outs]),
                          patches=torch.cat(patches) if same else None)


def random_mask_indices(n_rows: int, n_patches: int, ratio: float, device: Any,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exactly ``round(ratio * N)`` uniformly placed masked patches per row, as
    ``(masks [n_rows, N] bool, indices [n_rows * k], weights [n_rows * k])`` with fixed shapes
    (no host sync): the ``k`` smallest of i.i.d. uniform noise per row."""
    k = int(round(ratio * n_patches))
    order = torch.rand(n_rows, n_patches, device=device, generator=generator).argsort(dim=1)[:, :k]
    masks = torch.zeros(n_rows, n_patches, dtype=torch.bool, device=device).scatter_(1, order, True)
    rows = torch.arange(n_rows, device=device).unsqueeze(1) * n_patches
    indices = (rows + order).flatten()
    weights = torch.full((n_rows * k,), 1.0 / max(k, 1), device=device)
    return masks, indices, weights


def indices_from_masks(masks: Tensor) -> tuple[Tensor, Tensor]:
    """``(indices, weights)`` of a bool ``[n_rows, N]`` mask (one host sync: prefer the
    collate's precomputed ``mask_indices``/``mask_weights`` in training)."""
    counts = masks.sum(dim=1, keepdim=True).clamp_min(1).float()
    indices = masks.flatten().nonzero().squeeze(1)
    weights = (1.0 / counts).expand_as(masks).flatten().index_select(0, indices)
    return indices, weights


class ComposedMethod(SelfDistillationMethod):
    """Student/teacher self-distillation made of loss terms.

    Args:
        backbone: a :class:`~dinokit.backbones.Backbone` (see :func:`~dinokit.build_backbone`).
        terms: the loss terms; their heads are created on the student (and copied to the teacher).
        teacher: the teacher settings, resolved (EMA momentum, temperature warm-up).
        mask_ratio: ratio of the random masks drawn when a masked-patch term gets no masks from
            the batch (every global crop masked, an exact count per crop).
        output_class: the typed output (fields a term reports are filled when the class has them).
        temperature_endpoint, rules: as :class:`~dinokit.methods.base.SelfDistillationMethod`.
    """

    output_class: type[MethodOutput] = DINOv2Output

    def __init__(self, backbone: Backbone, terms: Sequence[LossTerm], *, teacher: TeacherSettings,
                 mask_ratio: float = 0.3, output_class: type[MethodOutput] | None = None,
                 temperature_endpoint: bool = True, rules: Mapping[str, Any] | None = None):
        terms = list(terms)
        if not terms:
            raise ValueError("a method needs at least one loss term")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}")
        consumes = frozenset().union(*(t.consumes for t in terms))
        if consumes & {MASKED_PATCHES, STUDENT_PATCHES} and not backbone.has_patch_tokens:
            users = [t.name for t in terms if t.consumes & {MASKED_PATCHES, STUDENT_PATCHES}]
            raise TypeError(f"terms {users} need patch tokens; {type(backbone).__name__} has none")
        if MASKED_PATCHES in consumes:
            if not backbone.supports_masking:
                raise TypeError(f"masked-patch terms need a ViT that takes a mask token; "
                                f"{type(backbone).__name__} does not")
            backbone.enable_mask_token()
        heads: dict[str, nn.Module] = {}
        for t in terms:
            for name, head in t.make_heads(backbone.embed_dim).items():
                if name in heads or name == "backbone":
                    raise ValueError(f"two loss terms create a head named {name!r}")
                heads[name] = head
        needed = {t.head_name for t in terms if hasattr(t, "head_name")}
        missing = needed - set(heads)
        if missing:
            raise ValueError(f"terms use heads {sorted(missing)} that no term creates")
        sections = [t.section for t in terms]
        if len(set(sections)) != len(sections):
            raise ValueError(f"loss term sections must be unique, got {sections}")
        super().__init__(nn.ModuleDict({"backbone": backbone, **heads}), teacher,
                         temperature_endpoint=temperature_endpoint, rules=rules)
        self.terms = nn.ModuleList(terms)
        self.mask_ratio = float(mask_ratio)
        if output_class is not None:
            self.output_class = output_class
        self._field_names = set(self.output_class.__dataclass_fields__)
        for t in terms:
            if hasattr(t, "bind"):
                t.bind(self.teacher_backbone)

    # ------------------------------------------------------------------ structure
    @property
    def consumes(self) -> frozenset[str]:
        return frozenset().union(*(t.consumes for t in self.terms))

    @property
    def needs_masks(self) -> bool:
        """Whether batches should bring iBOT masks (the collate reads this)."""
        return MASKED_PATCHES in self.consumes

    def term(self, name: str) -> LossTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no loss term named {name!r}; terms: {[t.name for t in self.terms]}")

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the step's tensor work (student, teacher, heads and every active loss term,
        :meth:`_step_terms`); the per-step scalars (the step, the teacher temperature, the terms'
        weights) stay outside as arguments, so training does not recompile at every step."""
        self._step_terms = torch.compile(self._step_terms, *args, **kwargs)  # type: ignore[method-assign]

    def term_timings(self) -> dict[str, TermTiming]:
        return {t.section: t.timing() for t in self.terms}

    def after_teacher_update(self, step: int) -> None:
        for t in self.terms:
            t.after_teacher_update(step, self.teacher_backbone)

    # ------------------------------------------------------------------ masks
    def _masks(self, masks: Tensor | None, mask_indices: Tensor | None, mask_weights: Tensor | None,
               n_rows: int, n_patches: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
        if masks is None:
            if mask_indices is not None:
                raise ValueError("mask_indices need the bool masks they index (masks=)")
            return random_mask_indices(n_rows, n_patches, self.mask_ratio, device)
        if masks.dtype != torch.bool or tuple(masks.shape) != (n_rows, n_patches):
            raise ValueError(f"masks must be bool [n_global * B, N] = [{n_rows}, {n_patches}], got "
                             f"{masks.dtype} {tuple(masks.shape)}")
        if mask_indices is None:
            return (masks, *indices_from_masks(masks))
        if mask_weights is None or mask_weights.shape != mask_indices.shape or mask_indices.ndim != 1:
            raise ValueError("mask_indices [U] and mask_weights [U] must come together, of one shape; got "
                             f"{None if mask_indices is None else tuple(mask_indices.shape)} and "
                             f"{None if mask_weights is None else tuple(mask_weights.shape)}")
        return masks, mask_indices, mask_weights

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        global_views: Sequence[Tensor] | None = None,
        local_views: Sequence[Tensor] | None = None,
        images: Tensor | None = None,
        masks: Tensor | None = None,
        mask_indices: Tensor | None = None,
        mask_weights: Tensor | None = None,
        values: StepValues | None = None,
        **_: Any,
    ) -> MethodOutput:
        """Training step on multi-crop views, or the teacher embedding of ``images``.

        Args:
            global_views: ``n_global`` tensors ``[B, C, H, W]`` (e.g. two 224 crops).
            local_views: ``n_local`` tensors ``[B, C, h, w]`` (e.g. 96 crops); may be empty.
            images: ``[B, C, H, W]``; when given, returns the teacher CLS embedding only (no
                gradient) and a zero loss.
            masks: bool ``[n_global * B, N]`` iBOT masks (True = masked); random masks are drawn
                when a masked-patch term gets none.
            mask_indices, mask_weights: ``[U]`` flat indices of the masked tokens (padded to a
                static bound) and their weights (0 = padding), as the collate makes them.
            values: this step's scheduled values from the run's clock (teacher temperature, each
                term's weight); without them, the method's own time (:class:`ManualTime`).
        """
        if images is not None:
            emb = self.embed(images)
            return self.output_class(loss=emb.new_zeros(()), embedding=emb)
        g, lv = check_views(global_views, local_views, self.student_backbone.in_chans)
        # This step's scalars, decided in Python (eagerly: they change every step) and handed to
        # the tensor work as arguments, so a compiled step is traced once, not once per step.
        if values is not None:
            step, temp, weights = values.step, float(values.teacher_temperature), values.weights
        else:
            step, temp = self.time.step, float(self.teacher_temperature)
            weights = {t.section: t.timing().at(step) for t in self.terms}
        active: list[tuple[LossTerm, float]] = []
        for t in self.terms:
            w = float(weights.get(t.section, 0.0))
            if w > 0.0:
                active.append((t, w))
        stage = values.stage if values is not None else None
        total, emb, stacked, fields = self._step_terms(g, lv, masks, mask_indices, mask_weights, active,
                                                       step, temp, stage)
        losses: dict[str, Tensor] = {}
        for (t, _w), value in zip(active, stacked.unbind(), strict=False):
            losses[f"loss_{t.name}"] = value
        for k in self._field_names:
            if k in losses:
                fields[k] = losses[k]
        # The typed output is built outside the compiled region: a compiled function returning a
        # custom object loses the loss's autograd graph under inductor.
        return self.output_class(loss=total, embedding=emb, losses=losses, teacher_temperature=temp,
                                 **fields)

    def _step_terms(self, g: list[Tensor], lv: list[Tensor], masks: Tensor | None,
                    mask_indices: Tensor | None, mask_weights: Tensor | None,
                    active: list[tuple[LossTerm, float]], step: int, temp: float,
                    stage: Stage | None = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        """The tensor work of a training step: the features the active terms consume, once, then
        each term. Returns ``(loss, embedding, each active term's loss [n_active], fields)``.
        :meth:`compile` compiles this function."""
        n_g, b = len(g), g[0].shape[0]
        # Plain loops (not comprehensions): torch.compile traces these without a graph break.
        needs: set[str] = set()
        cls_only = True  # every active term reads the backbone's CLS outputs only (DINO, KoLeo)
        for t, _w in active:
            needs.update(t.consumes)
            cls_only = cls_only and t.cls_only

        m = idx = wts = None
        if MASKED_PATCHES in needs:
            sizes = {tuple(v.shape[-2:]) for v in g}
            if len(sizes) != 1:
                raise ValueError(f"masked-patch terms need global views of one size, got {sorted(sizes)}")
            grid = self.student_backbone.grid_size(*g[0].shape[-2:])
            m, idx, wts = self._masks(masks, mask_indices, mask_weights, n_g * b, grid[0] * grid[1],
                                      g[0].device)

        t_out = None
        if TEACHER_GLOBAL in needs:
            with torch.no_grad():
                t_out = _merge(forward_views(self.teacher_backbone, g, cls_only=cls_only))
        s_local = None
        if LOCAL_CLS in needs and lv:  # one call: the backbone may pack every crop into one pass
            outs = forward_views(self.student_backbone, g + lv, m, breaks=(n_g,), cls_only=cls_only)
            n_runs = len(resolution_groups(g))
            s_global = _merge(outs[:n_runs])
            s_local = torch.cat([o.cls for o in outs[n_runs:]])
        else:
            s_global = _merge(forward_views(self.student_backbone, g, m, cls_only=cls_only))
        features = StepFeatures(
            n_global=n_g, batch_size=b, teacher_temperature=temp, step=step, training=self.training,
            global_images=torch.cat(g) if STUDENT_PATCHES in needs else None, student_global=s_global,
            student_local_cls=s_local, teacher_global=t_out, masks=m, mask_indices=idx,
            mask_weights=wts, stage=stage,
        )
        total: Tensor | None = None
        term_losses: list[Tensor] = []
        fields: dict[str, Any] = {}
        for t, w in active:
            r = t(features, self.student, self.teacher)
            total = w * r.loss if total is None else total + w * r.loss
            term_losses.append(r.loss)
            fields.update(r.outputs)
        if total is None:  # every term weighs 0 at this step
            total = s_global.cls.sum() * 0.0
        if self.check_finite:
            for name in ("student_logits", "teacher_logits"):
                if isinstance(fields.get(name), Tensor):
                    self._check_finite(name, fields[name])
            self._check_finite("loss", total)
        kept: dict[str, Any] = {}
        for k in self._field_names:
            if k in fields:
                kept[k] = fields[k]
        emb = (t_out.cls if t_out is not None else s_global.cls).detach()
        # The terms' losses as one new tensor: a detached alias of the loss among the outputs of a
        # compiled (inductor) function makes the returned loss lose its autograd graph.
        stacked = torch.stack(term_losses).detach() if term_losses else total.detach().reshape(1)
        return total, emb, stacked, kept
