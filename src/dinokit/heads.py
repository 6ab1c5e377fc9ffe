"""The DINO projection head (Caron et al. 2021, Sec. 3.1 and Appendix).

``x [B, D] -> MLP (Linear-GELU x (n-1), Linear to the bottleneck) -> L2 norm -> prototypes [B, K]``.
The prototype layer is bias-free and weight-normalised, ``w_k = g_k v_k / ||v_k||``; with
``norm_last_layer=True`` the gain ``g`` is fixed at 1, so the logits are cosine similarities
between the bottleneck feature and each prototype (the paper's stabilising choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        nn.init.trunc_normal_(self.weight_v, std=0.02)
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
        n_layers: MLP layers (3); 1 means a single Linear to the bottleneck.
        use_bn: BatchNorm after each hidden Linear (useful for CNNs; off for ViTs).
        norm_last_layer: fix the prototype gain at 1 (True) or let it train (False).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim), ("n_layers", n_layers)):
            if int(v) < 1:
                raise ValueError(f"DINOHead {name} must be >= 1, got {v}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)
        self.out_dim = out_dim

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_dim] -> logits [B, K]``."""
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(z)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients DINO cancels during the first epochs."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def cancel_last_layer_gradients(self) -> None:
        """Drop the prototype layer's gradients (set to None so optimisers skip it entirely)."""
        for p in self.last_layer.parameters():
            p.grad = None
