"""Machinery shared by the DINO-family methods: student/teacher pairs, step hooks, multi-crop.

A method owns ``student`` (backbone + heads, trained by the optimiser) and ``teacher`` (a frozen
copy moved by EMA). The training step drives it through explicit hooks, with each step's values
from the run's clock; a user's own loop can drive it by hand::

    out = method(global_views=g, local_views=l)
    out.loss.backward(); method.cancel_last_layer_gradients()  # during the first epochs
    optimizer.step(); method.update_teacher()                  # after every optimiser step
    method.set_epoch(epoch)                                    # at every epoch start
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from dinokit.backbones import Backbone, BackboneOutput
from dinokit.backbones.base import cls_embedding
from dinokit.clock import ManualTime, TermTiming, frozen_prefixes
from dinokit.ema import EMAUpdater, make_teacher
from dinokit.losses.centering import EMACenter
from dinokit.settings import TeacherSettings


@dataclass
class MethodOutput(Mapping):
    """Typed output that also reads like a dict (``out.loss`` or ``out["loss"]``) and like a
    Hugging Face ``ModelOutput`` (``out[0]``, ``out.to_tuple()``), so loops written for either
    take it without an adapter. ``None`` fields are left out of the mapping and tuple views.

    ``losses`` holds every loss term of the method by name (``{"loss_cls": ...}``, detached);
    training loops log it without knowing which terms a method has.
    """

    loss: Tensor | None = None
    embedding: Tensor | None = None
    losses: dict[str, Tensor] | None = None

    def __getitem__(self, key: str | int) -> Any:
        present = self._present()
        if isinstance(key, int):
            return getattr(self, present[key])
        if key not in present:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())

    def _present(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_dict(self) -> dict[str, Any]:
        """The non-None fields as a plain dict."""
        return {k: getattr(self, k) for k in self._present()}

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-None fields in declaration order (``ModelOutput.to_tuple``)."""
        return tuple(getattr(self, k) for k in self._present())


def check_views(
    global_views: Any, local_views: Any, in_chans: int | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Validate multi-crop inputs; errors name the argument, the index and the shapes seen.

    ``in_chans`` (the backbone's input channels, when known) is checked here too, so that a wrong
    channel count is reported against ``global_views[0]`` rather than the concatenated batch.
    """
    if global_views is None or (isinstance(global_views, Tensor) and global_views.ndim == 4):
        if global_views is None:
            raise ValueError("global_views is required in training (or pass images= to embed)")
        raise TypeError(
            "global_views must be a list of [B, C, H, W] tensors (one per crop), got a single "
            f"tensor of shape {tuple(global_views.shape)}; wrap it in a list"
        )
    g = list(global_views)
    lv = [] if local_views is None else list(local_views)
    if not g:
        raise ValueError("global_views is empty: at least one global crop is needed")
    ref: tuple[int, int] | None = None
    for name, views in (("global_views", g), ("local_views", lv)):
        for i, v in enumerate(views):
            if not isinstance(v, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(v).__name__}")
            if v.ndim != 4:
                raise ValueError(f"{name}[{i}] must be [B, C, H, W], got shape {tuple(v.shape)}")
            if ref is None:
                ref = (v.shape[0], v.shape[1])
                if in_chans is not None and v.shape[1] != in_chans:
                    raise ValueError(
                        f"{name}[{i}] has {v.shape[1]} channels (shape {tuple(v.shape)}) but the "
                        f"backbone expects {in_chans}"
                    )
            elif (v.shape[0], v.shape[1]) != ref:
                raise ValueError(
                    f"{name}[{i}] has batch size {v.shape[0]} and {v.shape[1]} channels (shape "
                    f"{tuple(v.shape)}), but global_views[0] has batch size {ref[0]} and "
                    f"{ref[1]} channels; all views must hold the same images"
                )
    return g, lv


def resolution_groups(views: Sequence[Tensor], breaks: Sequence[int] = ()) -> list[tuple[int, int]]:
    """``[start, end)`` runs of consecutive views with the same spatial size; a run also ends
    before every index in ``breaks`` (e.g. where the global crops end)."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or i in breaks or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


#: ``packed_crops`` modes: pack the resolution runs into one pass (True), never (False), or
#: "auto": pack where it measured faster (see :func:`packs_crops`).
PACKED_CROPS_MODES = ("auto", True, False)


def packs_crops(backbone: Backbone, views: Sequence[Tensor], n_groups: int) -> bool:
    """Whether :func:`forward_views` sends its ``n_groups`` resolution runs through
    ``backbone.forward_packed`` in one pass, by ``backbone.packed_crops``.

    ``"auto"`` packs wherever the backbone can (one pass over every crop instead of one per
    resolution: fewer, larger matrix products). A backbone (or block) with forward hooks runs
    unpacked whatever the mode: the hooks see one call per resolution run.
    """
    mode = getattr(backbone, "packed_crops", False)
    hooked = bool(backbone._forward_hooks or backbone._forward_pre_hooks)
    return n_groups >= 2 and bool(mode) and not hooked and bool(getattr(backbone, "can_pack", False))


def forward_views(
    backbone: Backbone, views: Sequence[Tensor], masks: Tensor | None = None,
    breaks: Sequence[int] = (), cls_only: bool = False,
) -> list[BackboneOutput]:
    """One batched backbone pass per run of same-size views (as DINO's ``MultiCropWrapper``), or
    one sequence-packed pass over all runs (``backbone.packed_crops``, see :func:`packs_crops`).

    ``masks`` (``[n_masked * B, N]``) belongs to the first ``n_masked`` views and is split along
    the same runs; the views after them go unmasked. Runs also end before each index in
    ``breaks``. Returns one output per run, each holding ``(end - start) * B`` rows in
    view-major order.

    ``cls_only``: the caller reads ``.cls`` only; passed on to backbones that take it
    (``backbone.supports_cls_only``, e.g. a ViT skipping the dead rows of its last block), whose
    outputs may then lack ``patches`` and ``registers``; other backbones run as usual.
    """
    b = views[0].shape[0]
    n_masked = 0 if masks is None else masks.shape[0] // b
    if masks is not None and n_masked < len(views):
        breaks = (*breaks, n_masked)
    inputs: list[tuple[Tensor, Tensor | None]] = []
    for start, end in resolution_groups(views, breaks):
        x = torch.cat(list(views[start:end]), dim=0) if end - start > 1 else views[start]
        m = None if masks is None or start >= n_masked else masks[start * b : end * b]
        inputs.append((x, m))
    kw = {"cls_only": True} if cls_only and getattr(backbone, "supports_cls_only", False) else {}
    if packs_crops(backbone, views, len(inputs)):
        return backbone.forward_packed(inputs, **kw)
    outs = []
    for x, m in inputs:
        outs.append(backbone(x, masks=m, **kw) if m is not None else backbone(x, **kw))
    return outs


class SelfDistillationMethod(nn.Module):
    """Student/teacher pair: the EMA teacher, the step hooks a training loop calls, multi-crop.

    The method counts no time. A training step (:class:`~dinokit.train.step.TrainingStep`) passes
    each step's scheduled values from the run's :class:`~dinokit.clock.Clock` to :meth:`forward`
    and to :meth:`after_optimizer_step`. Driven by hand (``out = model(...)``; ``optimizer.step()``;
    ``model.update_teacher()``; ``model.set_epoch(e)``), the method reads its own
    :class:`~dinokit.clock.ManualTime` instead.

    Args:
        student: a ``ModuleDict`` with at least ``backbone`` (a :class:`Backbone`) and ``head``.
        teacher: the teacher settings, resolved (EMA momentum cosine, temperature warm-up).
        temperature_endpoint: the temperature warm-up reaches its final value at its last index
            (DINO, DINOv2: ``np.linspace``) or one index later (DINOv3's schedules).
        rules: the method's official optimiser choices (``no_decay_rule``, ``clip_mode``,
            ``freeze_last_layer_mode``, ``layer_decay``, ``patch_embed_lr_mult``): what ``"auto"``
            (or ``None``) resolves to in every front door.
    """

    def __init__(self, student: nn.ModuleDict, teacher: TeacherSettings, *, temperature_endpoint: bool = True,
                 rules: Mapping[str, Any] | None = None):
        super().__init__()
        self.student = student
        self.teacher = make_teacher(student)
        self._disable_teacher_drop_path()
        self._ema = EMAUpdater(self.teacher, self.student)
        self.teacher_settings = teacher
        self.temperature_endpoint = temperature_endpoint
        self.time = ManualTime(teacher, temperature_endpoint)
        self.rules = dict(rules or {})
        self.check_finite = True
        self._frozen: tuple[str, ...] = ()

    # ----------------------------------------------------------------- structure
    @property
    def student_backbone(self) -> Backbone:
        return self.student["backbone"]

    @property
    def teacher_backbone(self) -> Backbone:
        return self.teacher["backbone"]

    @property
    def student_head(self) -> nn.Module:
        return self.student["head"]

    @property
    def teacher_head(self) -> nn.Module:
        return self.teacher["head"]

    @property
    def deployed_backbone(self) -> Backbone:
        """The network a run delivers (exported, embedded and monitored): the EMA teacher."""
        return self.teacher_backbone

    def trained_networks(self) -> dict[str, tuple[nn.ModuleDict, float]]:
        """The networks the optimiser trains, by name, each with its learning-rate multiplier:
        the student (a distillation may train several). Parameter groups and clipping are made
        per network."""
        return {"": (self.student, 1.0)}

    @property
    def head_names(self) -> list[str]:
        return [k for k in self.student if k != "backbone"]

    @property
    def embed_dim(self) -> int:
        return self.student_backbone.embed_dim

    def _disable_teacher_drop_path(self) -> None:
        # The teacher sees clean features: stochastic depth belongs to the student only.
        for m in self.teacher.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0

    # ----------------------------------------------------------------- the hooks of a training step
    def prepare_for_training_step(self) -> None:
        """A training step drives the method: the EMA centres move in :meth:`after_optimizer_step`
        (once per optimiser step, after its finiteness guard) and non-finite values are checked
        on the device by the step, not here (no per-step host sync)."""
        self.check_finite = False
        for m in self.modules():
            if isinstance(m, EMACenter):
                m.defer_updates(True)

    def term_timings(self) -> dict[str, TermTiming]:
        """Each loss term's weight and when it starts, by term section (what the clock schedules)."""
        return {}

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float, step: int, apply: Tensor | None = None,
                             micro_batches: int = 1) -> None:
        """After each optimiser step: ``teacher <- m teacher + (1 - m) student`` (frozen parts
        left as they are), the EMA centres committed (the mean of ``micro_batches`` batch means),
        and per-step state that follows the teacher (a Gram teacher's refresh at ``step``).
        ``apply`` (a 0-dim bool tensor) skips all of it on the device when False."""
        self._ema(float(momentum), apply)
        for m in self.modules():
            if isinstance(m, EMACenter):
                m.commit(micro_batches, apply=apply)
        self.after_teacher_update(step)

    def after_teacher_update(self, step: int) -> None:
        """Per-step state that follows the teacher (e.g. a Gram teacher's refresh)."""

    def freeze(self, parts: Sequence[str]) -> None:
        """Keep ``parts`` of student and teacher fixed (a stage's ``frozen``): their gradients are
        dropped after backward (:meth:`drop_frozen_gradients`), they run in eval mode in student
        and teacher (BatchNorm statistics stay, so the frozen student and teacher compute the same
        features) and the EMA leaves their teacher copies as they are."""
        prefixes = frozen_prefixes(parts, self.head_names)
        if prefixes == self._frozen:
            return
        self._frozen = prefixes
        self._ema.exclude(prefixes)
        self.train(self.training)

    #: whether training checkpoints hold the networks of :meth:`external_networks`
    checkpoint_external: bool = True

    def external_networks(self) -> dict[str, str]:
        """Networks the method reads from outside the run and never trains (a distillation's
        teacher), by attribute name, each with the fingerprint of its weights
        (:func:`~dinokit.weights.fingerprint`). Unless :attr:`checkpoint_external`, training
        checkpoints leave them out and record the fingerprints: a resumed run rebuilds them from
        its config and must find the same weights."""
        return {}

    @property
    def frozen(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the frozen parts (see :meth:`freeze`)."""
        return self._frozen

    def drop_frozen_gradients(self) -> None:
        if not self._frozen:
            return
        for name, p in self.student.named_parameters():
            if name.startswith(self._frozen):
                p.grad = None

    def train(self, mode: bool = True) -> SelfDistillationMethod:
        super().train(mode)
        if mode and self._frozen:
            for tree in (self.student, self.teacher):
                for name, m in tree.named_modules():
                    if name and f"{name}.".startswith(self._frozen):
                        m.eval()
        return self

    # ----------------------------------------------------------------- driven by hand
    def set_run_length(self, total_steps: int | None, steps_per_epoch: int | None = None) -> None:
        """Used without a training step: the run length that the momentum cosine spans and the
        epoch length that a per-step temperature warm-up needs."""
        self.time.set_run_length(total_steps, steps_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Used without a training step: call at the start of each epoch."""
        self.time.epoch = int(epoch)

    @property
    def teacher_temperature(self) -> float:
        """The teacher temperature now, by the method's own time (see :class:`ManualTime`)."""
        return self.time.teacher_temperature()

    def momentum(self, step: int | None = None) -> float:
        """EMA momentum at ``step`` by the method's own time (default: its current step)."""
        return self.time.momentum(step)

    @torch.no_grad()
    def update_teacher(self, momentum: float | None = None, apply: Tensor | None = None) -> float:
        """Used without a training step: call after each optimiser step. Moves the teacher (and
        the centres) with ``momentum`` or the method's own cosine schedule, then counts the step.
        Returns the momentum used."""
        m = self.momentum() if momentum is None else float(momentum)
        self.after_optimizer_step(m, self.time.step, apply)
        self.time.step += 1
        return m

    def student_parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains (the teacher is never in it)."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Prototype-layer parameters of every student head (frozen in the first epochs)."""
        out: list[nn.Parameter] = []
        for m in self.student.values():
            if hasattr(m, "last_layer_parameters"):
                out.extend(m.last_layer_parameters())
        return out

    def cancel_last_layer_gradients(self) -> None:
        """Drop the prototype layers' gradients (DINO freezes them for the first epoch(s))."""
        for p in self.last_layer_parameters():
            p.grad = None

    # ----------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, int]:
        return self.time.state_dict()

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.time.load_state_dict(state)

    # ----------------------------------------------------------------- helpers
    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Teacher CLS embedding ``[B, D]`` without gradient (what k-NN and export use)."""
        self.teacher_backbone.check_input(images, "images")
        return cls_embedding(self.teacher_backbone, images)

    def _check_finite(self, name: str, x: Tensor) -> None:
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{name} has non-finite values (shape {tuple(x.shape)}); the learning rate may be "
                "too high or the inputs contain NaN/inf"
            )
