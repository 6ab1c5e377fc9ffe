"""Typed outputs of the methods (they also read as mappings and as ``ModelOutput`` tuples)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dinokit.methods.base import MethodOutput


@dataclass
class DINOOutput(MethodOutput):
    """Output of :class:`~dinokit.DINO`.

    Attributes:
        loss: the weighted sum of the loss terms (a zero when only ``images`` were given).
        embedding: teacher CLS features, ``[n_global * B, D]`` in training, ``[B, D]`` for images.
        losses: each term's unweighted loss by name (``loss_cls``), detached.
        loss_cls: the DINO CLS loss, detached.
        teacher_logits: ``[n_global, B, K]`` (detached).
        student_logits: ``[n_views, B, K]``, global views first.
        teacher_entropy: mean entropy of the teacher distribution (nats, detached).
        teacher_kl_uniform: KL(mean teacher distribution || uniform) (nats, detached).
        teacher_temperature: the temperature used this step.
    """

    loss_cls: Tensor | None = None
    teacher_logits: Tensor | None = None
    student_logits: Tensor | None = None
    teacher_entropy: Tensor | None = None
    teacher_kl_uniform: Tensor | None = None
    teacher_temperature: float | None = None


@dataclass
class DINOv2Output(DINOOutput):
    """``loss = w_cls loss_cls + w_patch loss_patch + w_koleo loss_koleo (+ w_gram loss_gram)``;
    the components are detached. Other fields as :class:`DINOOutput`."""

    loss_patch: Tensor | None = None
    loss_koleo: Tensor | None = None
    loss_gram: Tensor | None = None
