"""Machinery shared by the DINO-family methods: student/teacher pairs, step hooks, multi-crop.

A method owns ``student`` (backbone + heads, trained by the optimiser) and ``teacher`` (a frozen
copy moved by EMA). Training loops drive it through explicit hooks, so Lightning, the plain
trainer, the estimator or a user's own loop all train it the same way::

    out = method(global_views=g, local_views=l)
    out.loss.backward(); method.cancel_last_layer_gradients()  # during the first epochs
    optimizer.step(); method.update_teacher(momentum)          # after every optimiser step
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
from dinokit.ema import EMAUpdater, make_teacher
from dinokit.schedules import CosineSchedule, TeacherTemperature


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

    ``"auto"`` packs wherever the backbone can: on the CPU the packed step took 0-8 % less CPU time
    than one pass per resolution at 1 thread, 10-30 % at 2 (BENCHMARKS.md, "Training step"); not
    yet measured on a GPU.
    A backbone (or block) with forward hooks runs unpacked whatever the mode: the hooks see one call
    per resolution run, as they always did.
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
    """Student/teacher pair with the EMA update and the teacher-temperature schedule.

    Args:
        student: a ``ModuleDict`` with at least ``backbone`` (a :class:`Backbone`) and ``head``.
        ema_decay_start, ema_decay_end: teacher momentum, cosine over ``total_steps``.
        temperature_teacher_warmup, temperature_teacher, warmup_epochs_temperature_teacher:
            the teacher temperature schedule (linear warm-up, then constant).
        temperature_warmup_unit: ``"epoch"`` (DINO: one value per epoch) or ``"step"`` (DINOv2/v3:
            per iteration, over ``warmup_epochs * steps_per_epoch`` steps; per epoch until
            :meth:`set_total_steps` gives the epoch length).
        total_steps: optimiser steps of the whole run (for the momentum cosine); may be set
            later with :meth:`set_total_steps`. Without it the momentum stays at its start value.
        check_finite: raise when logits turn non-finite. Costs one host sync per step; the
            training step turns it off and guards on the device instead.
    """

    #: np.linspace end point of the teacher-temperature warm-up: DINO/DINOv2 reach the final value
    #: at the warm-up's last index (True); DINOv3's scheduler one index later (False).
    temperature_warmup_endpoint: bool = True

    def __init__(
        self,
        student: nn.ModuleDict,
        *,
        ema_decay_start: float,
        ema_decay_end: float,
        temperature_teacher_warmup: float,
        temperature_teacher: float,
        warmup_epochs_temperature_teacher: int,
        temperature_warmup_unit: str = "epoch",
        total_steps: int | None = None,
        check_finite: bool = True,
    ):
        super().__init__()
        for name, v in (("ema_decay_start", ema_decay_start), ("ema_decay_end", ema_decay_end)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if temperature_warmup_unit not in ("epoch", "step"):
            raise ValueError(
                f"temperature_warmup_unit must be 'epoch' or 'step', got {temperature_warmup_unit!r}"
            )
        if warmup_epochs_temperature_teacher < 0:
            raise ValueError(
                f"warmup_epochs_temperature_teacher must be >= 0, got {warmup_epochs_temperature_teacher}"
            )
        for name, v in (("temperature_teacher_warmup", temperature_teacher_warmup),
                        ("temperature_teacher", temperature_teacher)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.student = student
        self.teacher = make_teacher(student)
        self._disable_teacher_drop_path()
        self._ema = EMAUpdater(self.teacher, self.student)
        self.ema_decay_start, self.ema_decay_end = float(ema_decay_start), float(ema_decay_end)
        self.temperature_teacher_warmup = float(temperature_teacher_warmup)
        self.temperature_teacher = float(temperature_teacher)
        self.warmup_epochs_temperature_teacher = int(warmup_epochs_temperature_teacher)
        self.temperature_warmup_unit = temperature_warmup_unit
        self.check_finite = check_finite
        self.epoch = 0
        self.step = 0
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None
        self.set_total_steps(total_steps)

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
    def embed_dim(self) -> int:
        return self.student_backbone.embed_dim

    def _disable_teacher_drop_path(self) -> None:
        # The teacher sees clean features: stochastic depth belongs to the student only.
        for m in self.teacher.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0

    # ----------------------------------------------------------------- step hooks
    def set_total_steps(self, total_steps: int | None, steps_per_epoch: int | None = None) -> None:
        """Set the run length that the momentum cosine spans (and the epoch length that a
        per-step teacher-temperature warm-up needs)."""
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.total_steps = total_steps
        if steps_per_epoch is not None:
            self.steps_per_epoch = int(steps_per_epoch)
        self.momentum_schedule = (
            CosineSchedule(self.ema_decay_start, self.ema_decay_end, total_steps)
            if total_steps
            else None
        )
        per_step = self.temperature_warmup_unit == "step" and self.steps_per_epoch
        length = self.warmup_epochs_temperature_teacher * (self.steps_per_epoch if per_step else 1)
        self.teacher_temp_schedule = TeacherTemperature(
            self.temperature_teacher_warmup, self.temperature_teacher, length,
            endpoint=self.temperature_warmup_endpoint,
        )

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of each epoch: sets the teacher temperature (and any per-epoch state)."""
        self.epoch = int(epoch)

    @property
    def teacher_temperature(self) -> float:
        """Teacher temperature now: indexed by the epoch (DINO) or the step (DINOv2/v3)."""
        if self.temperature_warmup_unit == "step" and self.steps_per_epoch:
            return self.teacher_temp_schedule(self.step)
        return self.teacher_temp_schedule(self.epoch)

    def momentum(self, step: int | None = None) -> float:
        """EMA momentum at ``step`` (default: the current step)."""
        if self.momentum_schedule is None:
            return self.ema_decay_start
        return self.momentum_schedule(self.step if step is None else step)

    @torch.no_grad()
    def update_teacher(self, momentum: float | None = None, apply: Tensor | None = None) -> float:
        """Call after each optimiser step: ``teacher <- m teacher + (1 - m) student``.

        Without ``momentum`` the cosine schedule at the current step is used. ``apply`` (a 0-dim
        bool tensor) skips the update on the device when False, e.g. after a non-finite step,
        without a host sync. Returns ``m``.
        """
        m = self.momentum() if momentum is None else float(momentum)
        self._ema(m, apply)
        self.step += 1
        self.after_teacher_update()
        return m

    def after_teacher_update(self) -> None:
        """Per-step state that follows the teacher (e.g. a Gram teacher's refresh)."""

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
        return {"epoch": self.epoch, "step": self.step, "total_steps": self.total_steps or 0,
                "steps_per_epoch": self.steps_per_epoch or 0}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.set_total_steps(int(state.get("total_steps", 0)) or None,
                             int(state.get("steps_per_epoch", 0)) or None)

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
