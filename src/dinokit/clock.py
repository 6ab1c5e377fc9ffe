"""The clock: every scheduled value of a run, and its stages, as a function of the optimiser step.

A run has one clock, built once from its settings and its length. For any optimiser step it gives
the learning rate (linear warm-up then cosine, scaled by the global batch; a stage may scale it or
warm it up again), the weight decay (cosine), whether the prototypes are frozen, the teacher's
EMA momentum (cosine) and temperature (linear warm-up, per epoch or per step), each loss term's
weight (a stage may override it; Gram anchoring starts late and may ramp up) and the active stage.
The training step asks the clock and hands the values to the method, which counts nothing.

The schedules are the official ones, end points included (:mod:`dinokit.schedules`): DINO's
``cosine_scheduler`` and DINOv2/v3's ``CosineScheduler`` for the learning rate, weight decay and
momentum, ``np.linspace`` warm-ups for the learning rate and the teacher temperature.

The clock holds no counter: the loop's optimiser-step counter (saved in checkpoints) is the one
step of the run. A method used without a training loop keeps its own :class:`ManualTime`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dinokit.schedules import CosineSchedule, TeacherTemperature, linear_ramp, scaled_lr
from dinokit.settings import FREEZABLE, OptimSettings, StageSettings, TeacherSettings


@dataclass(frozen=True)
class TermTiming:
    """When a loss term weighs what: ``weight``, 0 before ``start_step``, ramped up linearly over
    ``ramp_steps`` after it (DINOv3's Gram anchoring starts late)."""

    weight: float
    start_step: int = 0
    ramp_steps: int = 0

    def at(self, step: int) -> float:
        return linear_ramp(step, self.start_step, self.ramp_steps, self.weight)


@dataclass(frozen=True)
class Stage:
    """A stage placed on the run: ``[start, end)`` in optimiser steps and its overrides."""

    index: int
    name: str
    start: int
    end: int
    frozen: tuple[str, ...] = ()
    lr_mult: float = 1.0
    warmup_steps: int = 0
    weights: Mapping[str, float] = field(default_factory=dict)
    until_teacher_entropy: float | None = None
    gram_teacher_size: int | None = None
    teacher_momentum: float | None = None


@dataclass(frozen=True)
class StepValues:
    """Every scheduled value of one optimiser step.

    Attributes:
        step, epoch: the optimiser step and the epoch it falls in.
        lr: the learning rate (None when the caller's scheduler owns it: ``optim.lr_schedule=none``).
        weight_decay: the weight decay.
        last_layer_frozen: the prototypes stay fixed this step (their LR is 0, or their gradients
            are dropped, by ``optim.freeze_last_layer_mode``).
        momentum: the teacher's EMA momentum after this step.
        teacher_temperature: the teacher temperature of this step's targets.
        weights: each loss term's weight by term section (``dino``, ``ibot``, ``koleo``, ``gram``).
        stage: the active stage.
    """

    step: int
    epoch: int
    lr: float | None
    weight_decay: float
    last_layer_frozen: bool
    momentum: float
    teacher_temperature: float
    weights: Mapping[str, float]
    stage: Stage


def place_stages(stages: Sequence[StageSettings], total_steps: int, steps_per_epoch: int,
                 lengths: Mapping[int, int] | None = None) -> list[Stage]:
    """The stages on ``[0, total_steps)``, in order: each lasts its ``steps``, ``round(epochs x
    steps_per_epoch)`` or ``round(fraction x total_steps)``; the one stage that gives no length
    lasts what the others leave, and the last stage runs to the end of the run. A stage that would
    start after the end is empty (with a warning); no stages means one stage, ``all``.

    ``lengths`` gives the realised length of stages that ended otherwise than planned, by index (0:
    skipped; fewer steps: ended early). The stage without a length takes the steps they did not
    run when it follows them, so the stages after it keep their place (a high-resolution stage at
    the end of the run stays there); otherwise the stages after them start that much sooner."""
    if not stages:
        return [Stage(0, "all", 0, total_steps)]
    lengths = lengths or {}
    last = len(stages) - 1
    planned: list[int | None] = []
    for i, s in enumerate(stages):
        if i in lengths and i != last:
            planned.append(int(lengths[i]))
        elif s.steps is not None:
            planned.append(int(s.steps))
        elif s.epochs is not None:
            planned.append(max(1, round(s.epochs * steps_per_epoch)))
        elif getattr(s, "fraction", None) is not None:
            planned.append(max(1, round(s.fraction * total_steps)))
        else:
            planned.append(None)
    rest = [i for i, n in enumerate(planned) if n is None and i != last]
    if rest:  # a stage in the middle without a length: what the others leave
        others = sum(n for i, n in enumerate(planned) if n is not None)
        planned[rest[0]] = max(0, total_steps - others)
    placed, start = [], 0
    for i, s in enumerate(stages):
        length = planned[i] if planned[i] is not None else total_steps - start
        end = total_steps if i == last else min(total_steps, start + length)
        if start >= total_steps:
            warnings.warn(f"stage {s.name!r} starts after the run's {total_steps} steps: it does not run "
                          "(a longer trainer.epochs or trainer.max_steps reaches it)", stacklevel=2)
        placed.append(Stage(i, s.name, start, max(start, end), tuple(s.frozen), float(s.lr_mult),
                            max(0, round(s.warmup_epochs * steps_per_epoch)), dict(s.weights),
                            s.until_teacher_entropy, getattr(s, "gram_teacher_size", None),
                            getattr(s, "teacher_momentum", None)))
        start = max(start, end)
    return placed


class TeacherSchedule:
    """The teacher's schedules, the one home of both: the EMA momentum (cosine from
    ``teacher.momentum`` to ``final_momentum`` over ``total_steps``; its start value throughout
    when the length is unknown) and the temperature (``np.linspace`` warm-up, then constant, indexed
    by the epoch or, for ``warmup_unit="step"``, by the step over ``warmup_epochs x
    steps_per_epoch`` steps).

    Args:
        teacher: resolved teacher settings (``momentum`` and ``warmup_unit`` set).
        total_steps, steps_per_epoch: the run's length (None: unknown).
        endpoint: the warm-up reaches its final value at its last index (DINO, DINOv2) or one
            index later (DINOv3's schedules).
    """

    def __init__(self, teacher: TeacherSettings, total_steps: int | None, steps_per_epoch: int | None,
                 endpoint: bool = True):
        if teacher.momentum is None or teacher.warmup_unit is None:
            raise ValueError("the teacher's schedules need resolved settings (momentum and warmup_unit set)")
        self.teacher, self.steps_per_epoch = teacher, steps_per_epoch
        self.momentum_cosine = (CosineSchedule(teacher.momentum, teacher.final_momentum, total_steps)
                                if total_steps else None)
        self.per_step = teacher.warmup_unit == "step" and teacher.warmup_epochs > 0
        length = round(teacher.warmup_epochs * steps_per_epoch) if self.per_step and steps_per_epoch \
            else teacher.warmup_epochs
        self.warmup = TeacherTemperature(teacher.warmup_temperature, teacher.temperature, length,
                                         endpoint=endpoint)

    def momentum(self, step: int) -> float:
        return float(self.teacher.momentum) if self.momentum_cosine is None else self.momentum_cosine(step)

    def temperature(self, step: int, epoch: int) -> float:
        """Per step when the warm-up counts steps and the epoch length is known, else per epoch."""
        return self.warmup(step if self.per_step and self.steps_per_epoch else epoch)


class Clock:
    """Every scheduled value of a run, by optimiser step (see the module docstring).

    Args:
        optim: the optimiser settings (learning rate, its scaling and warm-up, weight decay,
            prototype freeze).
        teacher: the teacher settings, resolved (no ``None``: the method's official choices).
        terms: each loss term's timing by section (``{"dino": TermTiming(1.0), ...}``).
        total_steps, steps_per_epoch, global_batch: the run's length and batch (the LR scaling).
        stages: the run's stages (none: one stage).
        temperature_endpoint: the teacher-temperature warm-up reaches its final value at its last
            index (DINO, DINOv2) or one index later (DINOv3's ``linear_warmup_cosine_decay``).
        freeze_in_epochs: the prototype freeze is counted in whole epochs (DINO's
            ``epoch < freeze_last_layer``) rather than in steps (DINOv2/v3's LR schedule).
        lr_interval: ``"step"`` (the official per-iteration schedule) or ``"epoch"`` (the same
            warm-up and cosine counted in epochs, the learning rate held within each epoch).
        stage_lengths: realised lengths of stages that ended otherwise than planned, by index
            (:func:`place_stages`; a run's checkpoint holds them, :meth:`end_stage` adds to them).
    """

    def __init__(self, optim: OptimSettings, teacher: TeacherSettings, terms: Mapping[str, TermTiming], *,
                 total_steps: int, steps_per_epoch: int, global_batch: int,
                 stages: Sequence[StageSettings] = (), temperature_endpoint: bool = True,
                 freeze_in_epochs: bool = False, lr_interval: str = "step",
                 stage_lengths: Mapping[int, int] | None = None):
        self.total_steps, self.steps_per_epoch = max(1, int(total_steps)), max(1, int(steps_per_epoch))
        self.optim, self.teacher, self.terms = optim, teacher, dict(terms)
        self.freeze_in_epochs = freeze_in_epochs
        self.peak_lr = scaled_lr(optim.lr, global_batch, optim.lr_scaling, optim.lr_reference_batch)
        total, spe = self.total_steps, self.steps_per_epoch
        if lr_interval not in ("step", "epoch"):
            raise ValueError(f"lr_interval must be 'step' or 'epoch', got {lr_interval!r}")
        self.lr_per_epoch = lr_interval == "epoch"
        units, per_unit = (math.ceil(total / spe), 1) if self.lr_per_epoch else (total, spe)
        warmup = min(round(optim.warmup_epochs * per_unit), units)
        self.lr_schedule = CosineSchedule(self.peak_lr, min(optim.min_lr, self.peak_lr), units, warmup,
                                          optim.warmup_start_lr)
        self.wd_schedule = CosineSchedule(optim.weight_decay, optim.weight_decay_end, total)
        self.freeze_steps = min(round(optim.freeze_last_layer_epochs * spe), total)
        self.teacher_schedule = TeacherSchedule(teacher, total, spe, temperature_endpoint)
        self.stage_settings = list(stages)
        self.stage_lengths = {int(i): int(n) for i, n in (stage_lengths or {}).items()}
        self.stages = place_stages(self.stage_settings, total, spe, self.stage_lengths)

    def end_stage(self, index: int, step: int) -> Stage:
        """End stage ``index`` after optimiser step ``step`` (its last step); the steps it did not
        run go to the stage without a length when one follows (the later stages keep their place),
        else the later stages move up by them (:func:`place_stages`). Returns the next stage."""
        stage = self.stages[index]
        if not stage.start <= step < stage.end - 1 or index == len(self.stages) - 1:
            return self.stage_at(step + 1)
        self.stage_lengths[index] = step + 1 - stage.start
        with warnings.catch_warnings():  # placing them again repeats the run's own warnings
            warnings.simplefilter("ignore")
            self.stages = place_stages(self.stage_settings, self.total_steps, self.steps_per_epoch,
                                       self.stage_lengths)
        return self.stage_at(step + 1)

    def stage_at(self, step: int) -> Stage:
        for s in self.stages:
            if step < s.end:
                return s
        return self.stages[-1]

    def epoch_at(self, step: int) -> int:
        return step // self.steps_per_epoch

    def teacher_temperature(self, step: int, epoch: int | None = None) -> float:
        return self.teacher_schedule.temperature(step, self.epoch_at(step) if epoch is None else epoch)

    def lr(self, step: int, stage: Stage | None = None) -> float | None:
        o = self.optim
        if o.lr_schedule == "none":
            return None
        stage = stage or self.stage_at(step)
        index = self.epoch_at(step) if self.lr_per_epoch else step
        lr = self.peak_lr if o.lr_schedule == "constant" else self.lr_schedule(index)
        if stage.warmup_steps and step - stage.start < stage.warmup_steps:
            # np.linspace(0, 1, warmup)[i]: the stage's first step trains at lr 0, as the run's own warm-up
            lr *= (step - stage.start) / max(1, stage.warmup_steps - 1)
        return lr * stage.lr_mult

    def weights(self, step: int, stage: Stage | None = None) -> dict[str, float]:
        stage = stage or self.stage_at(step)
        return {name: float(stage.weights[name]) if name in stage.weights else t.at(step)
                for name, t in self.terms.items()}

    def at(self, step: int, epoch: int | None = None) -> StepValues:
        """The values of optimiser step ``step`` (``epoch``: the loop's epoch, when it counts them
        itself, e.g. with a shortened last epoch; else ``step // steps_per_epoch``)."""
        stage = self.stage_at(step)
        epoch = self.epoch_at(step) if epoch is None else epoch
        frozen = (epoch < self.optim.freeze_last_layer_epochs if self.freeze_in_epochs
                  else step < self.freeze_steps)
        return StepValues(step=step, epoch=epoch, lr=self.lr(step, stage),
                          weight_decay=self.wd_schedule(step),
                          last_layer_frozen=frozen,
                          momentum=(self.teacher_schedule.momentum(step) if stage.teacher_momentum is None
                                    else stage.teacher_momentum),
                          teacher_temperature=self.teacher_temperature(step, epoch),
                          weights=self.weights(step, stage), stage=stage)


class ManualTime:
    """The time of a method driven by hand, without a training loop (the seed-facing usage
    ``out = model(...); ...; model.update_teacher(); model.set_epoch(e)``): a step and an epoch
    counter and the teacher's schedules. A training step never reads it; it passes
    :class:`StepValues` from the run's :class:`Clock`.

    ``set_run_length`` gives the momentum cosine its length and the per-step temperature warm-up
    its epoch length; without it the momentum stays at its start value, and a per-step warm-up
    follows :meth:`set_epoch` instead, with a warning (once) naming the call to make.
    """

    def __init__(self, teacher: TeacherSettings, temperature_endpoint: bool = True):
        self.teacher, self.endpoint = teacher, temperature_endpoint
        self.step, self.epoch = 0, 0
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None
        self.schedule = TeacherSchedule(teacher, None, None, temperature_endpoint)
        self._warned = False

    def set_run_length(self, total_steps: int | None, steps_per_epoch: int | None = None) -> None:
        for name, v in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.total_steps = total_steps
        if steps_per_epoch is not None:
            self.steps_per_epoch = int(steps_per_epoch)
        self.schedule = TeacherSchedule(self.teacher, self.total_steps, self.steps_per_epoch, self.endpoint)

    def momentum(self, step: int | None = None) -> float:
        return self.schedule.momentum(self.step if step is None else step)

    def teacher_temperature(self) -> float:
        if self.schedule.per_step and not self.steps_per_epoch and not self._warned:
            warnings.warn("the teacher temperature warms up per step (teacher.warmup_unit='step') but "
                          "the method does not know the epoch length: it follows set_epoch() until "
                          "set_run_length(total_steps, steps_per_epoch) is called", stacklevel=3)
            self._warned = True
        return self.schedule.temperature(self.step, self.epoch)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "total_steps": self.total_steps or 0,
                "steps_per_epoch": self.steps_per_epoch or 0}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step, self.epoch = int(state.get("step", 0)), int(state.get("epoch", 0))
        self.set_run_length(int(state.get("total_steps", 0)) or None,
                            int(state.get("steps_per_epoch", 0)) or None)


def frozen_prefixes(parts: Sequence[str], head_names: Sequence[str]) -> tuple[str, ...]:
    """Parameter-name prefixes (in the student/teacher ``ModuleDict``) of the parts a stage freezes."""
    out: list[str] = []
    for part in parts:
        if part == "backbone":
            out.append("backbone.")
        elif part == "patch_embed":
            out.append("backbone.model.patch_embed.")
        elif part == "heads":
            out.extend(f"{h}." for h in head_names)
        elif part in head_names:
            out.append(f"{part}.")
        else:
            raise ValueError(f"stage part {part!r} is not one of {[*FREEZABLE, *head_names]}")
    return tuple(out)
