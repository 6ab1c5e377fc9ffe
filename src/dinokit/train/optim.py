"""Optimisers and parameter groups for DINO-family training.

* Weight-decay exemptions as named rules (:data:`NO_DECAY_RULES`), the official one per method:
  ``"dino"`` (DINO ``utils.get_params_groups``: biases and 1-D tensors), ``"dinov2"`` (DINOv2
  ``get_params_groups_with_decay``: names ending in ``.bias`` or containing ``norm`` or ``gamma``;
  tokens and position embeddings ARE decayed), ``"dinov3"`` (DINOv3 ``param_groups``: names ending
  in ``bias`` or containing ``norm``, ``gamma`` or ``fourier_w``), ``"dinokit"`` (every tensor
  with fewer than two dimensions, biases and the learned tokens).
* Layer-wise LR decay for ViTs (BEiT/DINOv2 ``get_vit_lr_decay_rate``): block ``i`` of ``L`` gets
  ``decay ** (L + 1 - (i + 1))``, the embeddings and tokens ``decay ** (L + 1)``, everything else
  (final norm, heads) 1; names containing ``patch_embed`` get ``patch_embed_lr_mult`` on top.
* Each group carries ``lr_scale``, ``wd_scale`` and ``is_last_layer``; every step sets
  ``lr = (last_layer_lr if is_last_layer else lr) * lr_scale`` and ``weight_decay = wd *
  wd_scale`` (DINOv2's ``apply_optim_scheduler``): a last-layer LR of 0 freezes the prototypes.
* Clipping: DINO's per-parameter norm (:func:`clip_per_parameter_`) or DINOv2's per-module norm
  (:func:`clip_per_module_`); neither reads a value back to the host.
* :func:`skip_step_if_`: an optimiser step skipped on the device when a flag tensor is set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

_EMBED = re.compile(
    r"(^|\.)(cls_token|reg_token|register_tokens|storage_tokens|mask_token|pos_embed|patch_embed)"
)
_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

#: Names of the weight-decay exemption rules accepted by :func:`param_groups`.
NO_DECAY_RULES = ("dino", "dinov2", "dinov3", "dinokit")


def clean_name(name: str) -> str:
    """Parameter name without the wrappers FSDP, activation checkpointing, DDP and
    ``torch.compile`` insert (as DINOv3's ``remove_fsdp_compile_names``)."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    name = name.replace("parametrizations.", "").removesuffix(".original")
    return name.removeprefix("module.")


def no_weight_decay(name: str, param: Tensor, rule: str = "dinokit") -> bool:
    """Whether ``param`` called ``name`` is exempt from weight decay under ``rule``."""
    name = clean_name(name)
    if rule == "dino":
        return name.endswith(".bias") or param.ndim == 1
    if rule == "dinov2":
        return name.endswith(".bias") or "norm" in name or "gamma" in name
    if rule == "dinov3":
        return name.endswith("bias") or "norm" in name or "gamma" in name or "fourier_w" in name
    if rule == "dinokit":
        return param.ndim <= 1 or name.endswith(".bias") or bool(
            re.search(r"(cls_token|reg_token|register_tokens|storage_tokens|mask_token|pos_embed)$", name)
        )
    raise ValueError(f"no_decay_rule must be one of {NO_DECAY_RULES}, got {rule!r}")


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings and tokens, ``i + 1`` for ``blocks.i``, ``n_blocks + 1`` for everything
    else (DINOv2's ``get_vit_lr_decay_rate`` on a backbone)."""
    name = clean_name(name)
    if _EMBED.search(name) and "head" not in name:
        return 0
    m = _BLOCK.search(name)
    if m and ".residual." not in name:
        return int(m.group(2)) + 1
    return n_blocks + 1


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    exclude_bias_and_norm_wd: bool = True,
    no_decay_rule: str = "dinokit",
    layer_decay: float = 1.0,
    n_blocks: int = 0,
    patch_embed_lr_mult: float = 1.0,
    last_layer_names: set[str] | None = None,
) -> list[dict]:
    """Group trainable parameters by (lr_scale, wd_scale, is_last_layer); frozen ones are skipped.

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. ``student.named_parameters()``.
        exclude_bias_and_norm_wd: apply ``no_decay_rule`` (False: everything is decayed).
        no_decay_rule: one of :data:`NO_DECAY_RULES`.
        layer_decay, n_blocks: layer-wise LR decay over ``n_blocks`` ViT blocks (1.0 = off).
        patch_embed_lr_mult: extra LR factor for ``patch_embed`` parameters (DINOv2: 0.2).
        last_layer_names: names flagged ``is_last_layer``; None = names containing ``last_layer``
            (the official rule).

    Returns optimiser groups with ``params``, ``names``, ``lr_scale``, ``wd_scale``,
    ``is_last_layer``.
    """
    if no_decay_rule not in NO_DECAY_RULES:
        raise ValueError(f"no_decay_rule must be one of {NO_DECAY_RULES}, got {no_decay_rule!r}")
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        exempt = exclude_bias_and_norm_wd and no_weight_decay(name, p, no_decay_rule)
        wd_scale = 0.0 if exempt else 1.0
        lr_scale = 1.0
        if layer_decay != 1.0 and n_blocks > 0:
            lr_scale = layer_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        if "patch_embed" in name:
            lr_scale *= patch_embed_lr_mult
        is_last = ("last_layer" in clean_name(name) if last_layer_names is None
                   else name in last_layer_names)
        key = (lr_scale, wd_scale, is_last)
        g = groups.setdefault(
            key, {"params": [], "names": [], "lr_scale": lr_scale, "wd_scale": wd_scale,
                  "is_last_layer": is_last},
        )
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by DINO for ResNet-50: SGD with momentum whose update of each
    weight matrix is scaled by the trust ratio ``eta * ||w|| / ||g + wd w||``; 1-D parameters
    (biases, norms) get plain SGD with momentum."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "eta": eta})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    ratio = torch.where(
                        (p_norm > 0) & (u_norm > 0), g["eta"] * p_norm / u_norm, torch.ones_like(p_norm)
                    )
                    dp = dp.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def _fused_supported(groups: list[dict]) -> bool:
    """Whether every parameter is a floating tensor on a device with fused optimiser kernels."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        devices = {"cuda"}
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(params) and all(  # FSDP2's sharded (DTensor) parameters take the foreach path
        isinstance(p, Tensor) and p.is_floating_point() and p.device.type in devices
        and not hasattr(p, "to_local") for p in params
    )


def build_optimizer(
    name: str, groups: list[dict], *, momentum: float = 0.9, betas: tuple = (0.9, 0.999),
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """``adamw`` | ``adam`` | ``sgd`` | ``lars``; learning rate and weight decay are set per step.

    ``fused``: None = the fused kernels (one launch per step, and a device-side skip through
    ``found_inf``, see :func:`skip_step_if_`) whenever torch has them for the parameters'
    device, CPU included; False = ``foreach``. Build the optimiser after moving the model.
    """
    name = name.lower()
    if name not in ("adamw", "adam", "sgd", "lars"):
        raise ValueError(f"optimizer must be 'adamw', 'adam', 'sgd' or 'lars', got {name!r}")
    if name == "lars":
        return LARS(groups, lr=0.0, momentum=momentum)
    use_fused = _fused_supported(groups) if fused is None else bool(fused)
    kw: dict = {"fused": True} if use_fused else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=tuple(betas), **kw)
    if name == "adam":
        return torch.optim.Adam(groups, lr=0.0, betas=tuple(betas), **kw)
    return torch.optim.SGD(groups, lr=0.0, momentum=momentum, weight_decay=0.0, **kw)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` runs torch's fused kernels (reads ``found_inf``/``grad_scale``)."""
    return (getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(g.get("fused", optimizer.defaults.get("fused")) for g in optimizer.param_groups))


def align_kernel_flags(optimizer: torch.optim.Optimizer) -> None:
    """Re-pick fused or foreach kernels for the parameters as they are now, after a loaded state
    dict has overwritten the groups' flags with those of the run that saved it (a fused 1-process
    run resumed under FSDP2, whose sharded parameters take the foreach path, or the reverse)."""
    if "fused" not in optimizer.defaults:
        return
    built_fused = bool(optimizer.defaults.get("fused"))  # what this run's optimiser was built with
    for g in optimizer.param_groups:
        fused = built_fused and _fused_supported([{"params": g["params"]}])
        g["fused"] = fused
        if fused:
            g["foreach"] = None


@torch.no_grad()
def skip_step_if_(optimizer: torch.optim.Optimizer, found_inf: Tensor,
                  step: Callable[[], Any] | None = None) -> None:
    """``optimizer.step()``, without effect when the 0-dim ``found_inf`` tensor is True/nonzero,
    decided on the device (no host sync).

    Fused Adam/AdamW/SGD take two optional attributes in ``step()`` (the hooks ``GradScaler`` uses):
    ``optimizer.found_inf`` (a float tensor; nonzero = leave parameters, moments and step counts as
    they were) and ``optimizer.grad_scale`` (here None: gradients are not scaled). They are set for
    this one step and removed after it. Other optimisers fall back to a snapshot: the parameters
    and optimiser-state tensors are copied, the step runs, and ``torch.where(found_inf, old, new)``
    puts back the old values (state created by a skipped first step is reset to zeros, which every
    optimiser here treats as "no history"). The fallback costs one copy of parameters and state.
    ``step`` replaces ``optimizer.step`` (an engine's wrapper around it).
    """
    run = optimizer.step if step is None else step
    flag = found_inf.detach()
    if is_fused(optimizer):
        optimizer.found_inf = flag.float().reshape(())  # type: ignore[attr-defined]
        optimizer.grad_scale = None  # type: ignore[attr-defined]
        try:
            run()
        finally:
            del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # FSDP2 (DTensor) parameters and state: each process restores its local shard.
    old = {id(p): [local_shard(t).clone() for t in _tensors(optimizer, p)] for p in params}
    run()
    for p in params:
        now = [local_shard(t) for t in _tensors(optimizer, p)]
        saved = old[id(p)]
        for i, t in enumerate(now):
            prev = saved[i] if i < len(saved) else torch.zeros_like(t)  # state made by this step
            t.copy_(torch.where(flag.to(device=t.device, dtype=torch.bool), prev, t))


def local_shard(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 ``DTensor`` (a view), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _tensors(optimizer: torch.optim.Optimizer, p: Tensor) -> list[Tensor]:
    """``p`` and its optimiser-state tensors, in a fixed order."""
    state = optimizer.state.get(p, {})
    return [p, *(state[k] for k in sorted(state) if isinstance(state[k], Tensor))]


@torch.no_grad()
def clip_per_module_(groups: Mapping[str, Iterable[Tensor]], max_norm: float) -> dict[str, Tensor]:
    """DINOv2/v3's clipping: ``clip_grad_norm_(module.parameters(), max_norm)`` for each module
    (the backbone and each head) separately. Returns each module's gradient norm before clipping
    (0-dim tensors; nothing is read back to the host)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norms = {}
    for key, params in groups.items():
        ps = [p for p in params if p.grad is not None]
        norms[key] = (torch.nn.utils.clip_grad_norm_(ps, max_norm) if ps else torch.zeros(()))
    return norms


@torch.no_grad()
def clip_per_parameter_(params: Iterable[Tensor], max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient rescaled to norm at most ``max_norm``.

    Fused (``_foreach_norm`` / ``_foreach_mul_``), with no host synchronisation.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    scales = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def set_group_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                              last_layer_lr: float | None = None) -> None:
    """Apply this step's scheduled values: ``lr * lr_scale`` (``last_layer_lr * lr_scale`` for
    groups flagged ``is_last_layer`` when given) and ``weight_decay * wd_scale`` per group."""
    for g in optimizer.param_groups:
        base = last_layer_lr if last_layer_lr is not None and g.get("is_last_layer") else lr
        g["lr"] = base * g.get("lr_scale", 1.0)
        if "weight_decay" in g:
            g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)
