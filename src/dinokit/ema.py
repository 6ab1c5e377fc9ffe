"""The EMA teacher update of DINO (Caron et al. 2021, Sec. 3.1): ``t <- m t + (1 - m) s``.

As the official code (DINO ``main_dino.py``, DINOv2/v3 ``update_teacher``/``update_ema``):
parameters only, as ``t * m + s * (1 - m)`` with ``torch._foreach_mul_`` / ``_foreach_add_`` (a
handful of kernel launches instead of one per tensor). The teacher's buffers (BatchNorm running
statistics) are its own and are never touched, unless ``copy_buffers=True``.

The parameter lists are re-derived from the modules at every call (a cheap walk over the module
tree), so the update follows the modules wherever they are moved: ``.to(dtype)``, a device move,
FSDP2's ``fully_shard`` (which replaces each ``Parameter`` by a DTensor one). A step can be
skipped on the device (``apply`` tensor), without a host sync.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

try:  # FSDP2's public API (torch >= 2.6); older torch has no FSDP2 module to reshard
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch
    FSDPModule = None


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` (no gradients ever reach it)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _check_pairing(teacher: nn.Module, student: nn.Module) -> list[str] | None:
    """Names in the student's order; None when both list them in the same order (zip is enough)."""
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
    return None if list(t_params) == list(s_params) else list(s_params)


class EMAUpdater:
    """Checks once that teacher and student have the same parameters; each call applies one EMA
    step to the parameters the modules hold *now*.

    Parameters are paired by name, so both modules must have the same structure.

    Args:
        teacher, student: modules of the same structure.
        copy_buffers: also copy the student's buffers into the teacher (not official; off).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, copy_buffers: bool = False):
        self.teacher, self.student = teacher, student
        self._names = _check_pairing(teacher, student)
        self.copy_buffers = bool(copy_buffers)
        self._excluded: tuple[str, ...] = ()
        self._kept: list[str] | None = None  # the parameters updated while some are excluded

    def exclude(self, prefixes: tuple[str, ...]) -> None:
        """Leave the teacher parameters whose names start with one of ``prefixes`` as they are
        (parts a training stage keeps frozen); ``()`` updates every parameter again."""
        self._excluded = tuple(prefixes)
        names = self._names if self._names is not None else [n for n, _ in self.student.named_parameters()]
        self._kept = [n for n in names if not n.startswith(self._excluded)] if self._excluded else None

    def _pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        _reshard(self.teacher)
        _reshard(self.student)
        if self._names is None and self._kept is None:
            return list(self.teacher.parameters()), list(self.student.parameters())
        t = dict(self.teacher.named_parameters())
        s = dict(self.student.named_parameters())
        names = self._kept if self._kept is not None else self._names
        return [t[n] for n in names], [s[n] for n in names]

    @torch.no_grad()
    def __call__(self, momentum: float, apply: Tensor | None = None) -> None:
        """``t <- m t + (1 - m) s`` for every parameter.

        Args:
            momentum: ``m`` in [0, 1] (a float).
            apply: optional 0-dim bool/float tensor; False/0 leaves the teacher unchanged (the
                weight becomes ``(1 - m) * apply``; no host sync). A skipped step still reads the
                student: its parameters must be finite.
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        t_list, s_list = self._pairs()
        if apply is not None and callable(getattr(apply, "full_tensor", None)):
            apply = apply.full_tensor()  # a flag computed from FSDP2-sharded gradients is a DTensor
        if t_list:
            if apply is None:
                if momentum < 1.0:
                    torch._foreach_mul_(t_list, momentum)
                    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
            else:
                self._masked_update(t_list, s_list, momentum, apply)
        if self.copy_buffers:
            t_bufs = dict(self.teacher.named_buffers())
            for n, b in self.student.named_buffers():
                if n in t_bufs:
                    if apply is None:
                        t_bufs[n].copy_(b)
                    else:
                        flag = apply.to(device=b.device).bool()
                        t_bufs[n].copy_(torch.where(flag, b, t_bufs[n]))

    @staticmethod
    def _masked_update(t_list: list[Tensor], s_list: list[Tensor], momentum: float, apply: Tensor) -> None:
        """``t * m' + s * w`` with ``w = (1 - m) * apply`` and ``m' = 1 - w``, per (device, dtype)."""
        groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for t, s in zip(t_list, s_list):
            key = (t.device, t.dtype, type(t))
            groups.setdefault(key, ([], []))
            groups[key][0].append(t)
            groups[key][1].append(s)
        for (device, dtype, _), (ts, ss) in groups.items():
            ts, ss = _local(ts), _local(ss)
            flag = apply.detach().to(device=device, dtype=torch.bool)
            one = torch.ones((), device=device, dtype=dtype)
            m = torch.where(flag, torch.full_like(one, momentum), one)
            w = torch.where(flag, torch.full_like(one, 1.0 - momentum), torch.zeros_like(one))
            torch._foreach_mul_(ts, m)
            torch._foreach_add_(ts, torch._foreach_mul(ss, w))


def _reshard(module: nn.Module) -> None:
    """Register the sharded parameters of FSDP2 modules (``FSDPModule.reshard``, a no-op when they
    already are): a root module keeps its gathered parameters after a forward pass without a
    backward one (the teacher's, an evaluation pass), and the EMA must update the shards."""
    if FSDPModule is None:  # pragma: no cover - older torch
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """The local shards of DTensor parameters (FSDP2, recognised by their ``to_local``), updated in
    place; other tensors as they are."""
    return [x.to_local() if callable(getattr(x, "to_local", None)) else x for x in tensors]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float, copy_buffers: bool = False) -> None:
    """One-off EMA step (checks the pairing each call; use :class:`EMAUpdater` in a loop)."""
    EMAUpdater(teacher, student, copy_buffers=copy_buffers)(momentum)
