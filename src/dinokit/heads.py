"""The DINO projection head (Caron et al. 2021, Sec. 3.1 and Appendix).

``x [B, D] -> MLP (Linear-GELU x (n-1), Linear to the bottleneck) -> L2 norm -> prototypes [B, K]``.

* DINO / DINOv2 (``weight_norm=True``): the prototype layer is bias-free and weight-normalised,
  ``w_k = g_k v_k / ||v_k||``, ``g`` initialised to 1; with ``norm_last_layer=True`` (DINO's
  default) ``g`` stays fixed, so the logits are cosine similarities; DINOv2 trains ``g``
  (``norm_last_layer=False``). ``v`` keeps ``nn.Linear``'s default init (the official heads build
  the layer after their trunc-normal init pass).
* DINOv3 (``weight_norm=False``): a plain bias-free ``Linear``, trunc-normal(0.02) like the MLP.

MLP Linear layers: trunc-normal(std 0.02), bias 0. The L2 normalisation uses ``eps=1e-12``
(``1e-6`` for fp16 inputs), as the official DINOv2/v3 heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinokit.settings import HeadSettings

#: How a head's linear layers start (:class:`DINOHead`'s ``init``).
HEAD_INITS = ("trunc_normal", "torch")


class WeightNormLinear(nn.Module):
    """Bias-free ``Linear`` with weight normalisation ``W = g * V / ||V||`` per output row.

    Args:
        in_features: input width (the bottleneck).
        out_features: number of prototypes ``K``.
        fixed_gain: keep ``g = 1`` (not trainable), as DINO's ``norm_last_layer=True``.
    """

    def __init__(self, in_features: int, out_features: int, fixed_gain: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as official
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_gain)

    @property
    def weight(self) -> Tensor:
        """Effective weight ``[K, in_features]``."""
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        fixed = not self.weight_g.requires_grad
        return f"in_features={self.in_features}, out_features={self.out_features}, fixed_gain={fixed}"


class DINOHead(nn.Module):
    """MLP + L2 normalisation + weight-normalised prototypes.

    Args:
        in_dim: backbone embedding width ``D``.
        out_dim: number of prototypes ``K`` (DINO: 65536).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: width before the prototypes (256).
        layers: MLP layers (3); 1 means a single Linear to the bottleneck.
        batch_norm: BatchNorm after each hidden Linear (useful for CNNs; off for ViTs).
        norm_last_layer: fix the prototype gain at 1 (True, DINO) or let it train (False,
            DINOv2); only for ``weight_norm=True``.
        weight_norm: weight-normalised prototypes (True, DINO/DINOv2) or a plain bias-free
            ``Linear`` (False, DINOv3).
        init: ``"trunc_normal"`` (official: every ``Linear`` of the MLP, and plain prototypes,
            trunc-normal(0.02) with zero biases) or ``"torch"`` (``nn.Linear``'s own
            kaiming-uniform weights and uniform biases, as stable-pretraining's heads keep them).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
        weight_norm: bool = True,
        init: str = "trunc_normal",
    ):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"DINOHead init must be one of {HEAD_INITS}, got {init!r}")
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim), ("layers", layers)):
            if int(v) < 1:
                raise ValueError(f"DINOHead {name} must be >= 1, got {v}")
        mlp: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mlp.append(nn.Linear(dim, hidden_dim))
            if batch_norm:
                mlp.append(nn.BatchNorm1d(hidden_dim))
            mlp.append(nn.GELU())
            dim = hidden_dim
        mlp.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*mlp)
        if init == "trunc_normal":
            self.mlp.apply(self._init)
        self.weight_norm = bool(weight_norm)
        self.last_layer: nn.Module
        if self.weight_norm:
            self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)
        else:
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
            if init == "trunc_normal":
                self._init(self.last_layer)
        self.out_dim = out_dim

    @classmethod
    def from_settings(cls, in_dim: int, out_dim: int, heads: HeadSettings) -> DINOHead:
        """A head of ``out_dim`` prototypes with the architecture of ``heads`` (resolved: its
        ``norm_last_layer`` and ``weight_norm`` set)."""
        return cls(in_dim, out_dim, hidden_dim=heads.hidden_dim, bottleneck_dim=heads.bottleneck_dim,
                   layers=heads.layers, batch_norm=heads.batch_norm,
                   norm_last_layer=True if heads.norm_last_layer is None else heads.norm_last_layer,
                   weight_norm=True if heads.weight_norm is None else heads.weight_norm, init=heads.init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_dim] -> logits [B, K]``."""
        z = self.mlp(x)
        z = F.normalize(z, dim=-1, p=2, eps=1e-6 if z.dtype == torch.float16 else 1e-12)
        return self.last_layer(z)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients DINO cancels during the first epochs."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def cancel_last_layer_gradients(self) -> None:
        """Drop the prototype layer's gradients (set to None so optimisers skip it entirely)."""
        for p in self.last_layer.parameters():
            p.grad = None
