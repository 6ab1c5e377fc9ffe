"""The EMA teacher update of DINO (Caron et al. 2021, Sec. 3.1): ``t <- m t + (1 - m) s``.

One fused pass over all parameters with ``torch._foreach_*`` (a handful of kernel launches instead
of one per tensor); buffers (BatchNorm statistics) are copied from the student. The parameter
pairing is worked out once, not at every step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` (no gradients ever reach it)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class EMAUpdater:
    """Pairs a teacher with its student once; each call applies one EMA step.

    Parameters are paired by name, so both modules must have the same structure.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module):
        t_params = dict(teacher.named_parameters())
        s_params = dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            diff = sorted(set(s_params) ^ set(t_params))[:5]
            raise ValueError(f"teacher and student differ in parameters, e.g. {diff}")
        shapes = [n for n, p in s_params.items() if t_params[n].shape != p.shape]
        if shapes:
            n = shapes[0]
            raise ValueError(
                f"teacher and student differ in parameter shapes, e.g. {n}: teacher "
                f"{tuple(t_params[n].shape)} vs student {tuple(s_params[n].shape)}"
            )
        self._t = [t_params[n] for n in s_params]
        self._s = list(s_params.values())
        t_bufs = dict(teacher.named_buffers())
        self._bufs = [(t_bufs[n], b) for n, b in student.named_buffers() if n in t_bufs]

    @torch.no_grad()
    def __call__(self, momentum: float) -> None:
        """``t <- m t + (1 - m) s`` for every parameter; buffers copied. ``m`` is a float."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        if momentum < 1.0 and self._t:
            # _foreach_lerp_: t + (1 - m) (s - t) == m t + (1 - m) s, one fused kernel per dtype.
            torch._foreach_lerp_(self._t, self._s, 1.0 - momentum)
        for t, s in self._bufs:
            t.copy_(s)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """One-off EMA step (builds the pairing each call; use :class:`EMAUpdater` in a loop)."""
    EMAUpdater(teacher, student)(momentum)
