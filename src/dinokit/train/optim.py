"""Optimisers and parameter groups for DINO-family training.

* Biases, norm parameters and other 1-D tensors (tokens, gains) get no weight decay (DINO's
  ``get_params_groups``).
* Layer-wise LR decay for ViTs (BEiT/DINOv2): block ``i`` of ``L`` gets ``decay ** (L + 1 - layer)``
  with the embeddings at layer 0 and the heads at ``L + 1``; the patch embedding may get an extra
  multiplier (DINOv2: 0.2).
* Each group carries ``lr_scale`` and ``wd_scale``; the schedules set ``lr = lr(t) * lr_scale`` and
  ``weight_decay = wd(t) * wd_scale`` every step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

_EMBED = re.compile(r"(^|\.)(cls_token|reg_token|register_tokens|mask_token|pos_embed|patch_embed)")
_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")


def no_weight_decay(name: str, param: Tensor) -> bool:
    """Biases, norm weights, tokens and gains: every tensor with fewer than two dimensions, plus
    the learned tokens (cls/register/mask/position)."""
    return param.ndim <= 1 or name.endswith(".bias") or bool(
        re.search(r"(cls_token|reg_token|register_tokens|mask_token|pos_embed)$", name)
    )


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings, ``i + 1`` for ``blocks.i``, ``n_blocks + 1`` for everything after."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(2)) + 1
    if _EMBED.search(name) and "head" not in name:
        return 0
    return n_blocks + 1


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    exclude_bias_and_norm_wd: bool = True,
    layer_decay: float = 1.0,
    n_blocks: int = 0,
    patch_embed_lr_mult: float = 1.0,
    last_layer_names: set[str] | None = None,
) -> list[dict]:
    """Group trainable parameters by (lr_scale, wd_scale); frozen ones are skipped.

    Returns optimiser groups with ``params``, ``names``, ``lr_scale``, ``wd_scale``,
    ``is_last_layer``.
    """
    groups: dict[tuple[float, float, bool], dict] = {}
    last_layer_names = last_layer_names or set()
    for name, p in named_params:
        if not p.requires_grad:
            continue
        wd_scale = 0.0 if exclude_bias_and_norm_wd and no_weight_decay(name, p) else 1.0
        lr_scale = 1.0
        if layer_decay != 1.0 and n_blocks > 0:
            lr_scale = layer_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        if "patch_embed" in name:
            lr_scale *= patch_embed_lr_mult
        is_last = name in last_layer_names
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


def build_optimizer(
    name: str, groups: list[dict], *, momentum: float = 0.9, betas: tuple = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """``adamw`` | ``sgd`` | ``lars``; learning rate and weight decay are set per step later."""
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=tuple(betas))
    if name == "adam":
        return torch.optim.Adam(groups, lr=0.0, betas=tuple(betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum, weight_decay=0.0)
    if name == "lars":
        return LARS(groups, lr=0.0, momentum=momentum)
    raise ValueError(f"optimizer must be 'adamw', 'adam', 'sgd' or 'lars', got {name!r}")


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


def set_group_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply this step's scheduled values: ``lr * lr_scale`` and ``weight_decay * wd_scale`` per group."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if "weight_decay" in g:
            g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)
