"""CNNs (timm, torchvision) and any ``nn.Module`` behind the dinokit feature interface.

The wrapped module may return a pooled vector ``[B, D]``, a token sequence ``[B, T, D]`` (first
token is taken as CLS) or a feature map ``[B, D, H, W]`` (average-pooled for the embedding, its
cells flattened into ``patches``). timm models are read through ``forward_features`` /
``forward_head(pre_logits=True)`` so that the unpooled map is available too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dinokit.backbones.base import Backbone, BackboneOutput

#: Input sizes tried, largest first after the model's own, to find the embedding width.
PROBE_SIZES: tuple[int, ...] = (224, 128, 96, 64, 32, 28, 16, 8)


def first_conv_in_channels(module: nn.Module) -> int | None:
    """Input channels of the first convolution or patch projection, if there is one."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def _model_input_size(module: nn.Module) -> int | None:
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return int(cfg["input_size"][-1])
    return None


def _to_output(features: object, name: str) -> BackboneOutput:
    if not isinstance(features, Tensor):
        raise TypeError(
            f"backbone {name} returned {type(features).__name__}; it must return a tensor "
            "[B, D], [B, T, D] or [B, D, H, W]"
        )
    if features.ndim == 2:
        return BackboneOutput(cls=features)
    if features.ndim == 3:
        return BackboneOutput(cls=features[:, 0], patches=features[:, 1:])
    if features.ndim == 4:
        return BackboneOutput(cls=features.mean(dim=(2, 3)), patches=features.flatten(2).transpose(1, 2))
    raise ValueError(
        f"backbone {name} returned shape {tuple(features.shape)}; expected [B, D], [B, T, D] "
        "or [B, D, H, W]"
    )


class ModuleBackbone(Backbone):
    """Any ``nn.Module`` taking ``[B, C, H, W]`` images.

    Args:
        model: the network; a classifier should have its head removed (``build_backbone`` does
            that for timm and torchvision names).
        probe_sizes: input sizes tried (after the model's own default) to find the embedding width.
        timm_name: timm architecture name, recorded for export.
    """

    def __init__(
        self,
        model: nn.Module,
        probe_sizes: Sequence[int] = PROBE_SIZES,
        timm_name: str | None = None,
    ):
        super().__init__()
        self.model = model
        self.timm_name = timm_name
        self._timm_style = hasattr(model, "forward_features") and hasattr(model, "forward_head")
        self.in_chans = first_conv_in_channels(model)
        dim, has_map, size = self._probe(probe_sizes)
        self.embed_dim = dim
        self._has_feature_map = has_map
        #: input size at which the width was found (a hint for pictures and defaults).
        self.probe_size = size
        #: weights and inputs in channels-last (NHWC) memory format (:meth:`use_channels_last`).
        self.channels_last = False

    @property
    def has_convolutions(self) -> bool:
        """Whether the network has 2-D convolutions (channels-last only changes those)."""
        return self.in_chans is not None

    def use_channels_last(self, enable: bool = True) -> ModuleBackbone:
        """Keep the weights and feed the inputs in channels-last (NHWC) memory format, the layout
        cuDNN's and oneDNN's fastest convolution kernels work in (no transposes around each
        convolution; PyTorch's channels-last tutorial). Same values, other strides; exports and
        checkpoints are unaffected (they store contiguous tensors)."""
        fmt = torch.channels_last if enable else torch.contiguous_format
        self.model.to(memory_format=fmt)
        self.channels_last = bool(enable)
        return self

    def _features(self, x: Tensor) -> BackboneOutput:
        if self._timm_style:
            fmap = self.model.forward_features(x)
            pooled = self.model.forward_head(fmap, pre_logits=True)
            out = _to_output(fmap, type(self.model).__name__)
            if pooled.ndim == 2:
                out.cls = pooled
            return out
        return _to_output(self.model(x), type(self.model).__name__)

    @torch.no_grad()
    def _probe(self, probe_sizes: Sequence[int]) -> tuple[int, bool, int]:
        sizes = [s for s in (_model_input_size(self.model), *probe_sizes) if s]
        chans = self.in_chans or 3
        was_training = self.model.training
        self.model.eval()
        errors: list[str] = []
        try:
            for s in dict.fromkeys(sizes):
                try:
                    out = self._features(torch.zeros(2, chans, s, s))
                except TypeError:
                    raise
                except Exception as e:  # a size this model cannot take: try the next one
                    errors.append(f"{s}px: {type(e).__name__}: {str(e)[:120]}")
                    continue
                has_map = out.patches is not None and out.patches.shape[1] > 0
                #: width of the patch features seen by the probe (checked against ``embed_dim``).
                self.patch_width = int(out.patches.shape[-1]) if has_map else None
                return int(out.cls.shape[-1]), has_map, s
        finally:
            self.model.train(was_training)
        raise ValueError(
            f"could not find the embedding width of {type(self.model).__name__}: no input size "
            f"worked ({'; '.join(errors)})"
        )

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map ``(rows, cols)`` of an ``height x width`` input (timm CNNs: total stride)."""
        info = getattr(self.model, "feature_info", None)
        if not self._has_feature_map or not info:
            raise TypeError(f"{type(self.model).__name__} has no known feature-map grid")
        r = int(info[-1]["reduction"])
        return max(1, height // r), max(1, width // r)

    def forward(self, x: Tensor, masks: Tensor | None = None) -> BackboneOutput:
        if masks is not None:
            self.enable_mask_token()  # raises: CNNs cannot mask patches
        self.check_input(x)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._features(x)
        if out.cls.ndim != 2 or out.cls.shape[-1] != self.embed_dim:
            raise ValueError(
                f"backbone {type(self.model).__name__} gave an embedding of shape "
                f"{tuple(out.cls.shape)}, expected [B, {self.embed_dim}]"
            )
        return out


def use_channels_last(module: nn.Module, enable: bool = True) -> int:
    """:meth:`ModuleBackbone.use_channels_last` on every convolutional backbone inside ``module``
    (a method's student, teacher and any other copy alike, so the EMA pairs keep one layout);
    returns how many were changed. ViTs are left as they are."""
    found = [m for m in module.modules() if isinstance(m, ModuleBackbone) and m.has_convolutions]
    for m in found:
        m.use_channels_last(enable)
    return len(found)
