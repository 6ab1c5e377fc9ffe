"""DINOv2-style training (Oquab et al., TMLR 2024): the DINO CLS loss and the iBOT masked-patch
loss (Zhou et al. 2022), both with Sinkhorn-Knopp centring of the teacher, plus the KoLeo
regulariser on the student's CLS embeddings. Optional register tokens (Darcet et al. 2024).

The student sees the global crops with some patches replaced by a learned mask token (masks come
from the collate; a random mask is drawn here only when none is given) and the local crops
unmasked; the teacher sees the unmasked global crops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dinokit.backbones import build_backbone
from dinokit.heads import DINOHead
from dinokit.losses.dino import DINOLoss, dino_cross_entropy, teacher_diagnostics
from dinokit.losses.ibot import IBOTPatchLoss
from dinokit.losses.koleo import koleo_loss
from dinokit.losses.sinkhorn import sinkhorn_knopp
from dinokit.masking import random_mask
from dinokit.methods.base import MethodOutput, SelfDistillationMethod, check_views, forward_views


@dataclass
class DINOv2Output(MethodOutput):
    """``loss`` = ``loss_cls + w_patch * loss_patch + w_koleo * loss_koleo (+ w_gram * loss_gram)``;
    the components are detached. ``embedding``: teacher CLS ``[n_global * B, D]`` (``[B, D]`` for
    images). ``teacher_logits [n_global, B, K]``, ``student_logits [n_views, B, K]`` (CLS head)."""

    loss_cls: Tensor | None = None
    loss_patch: Tensor | None = None
    loss_koleo: Tensor | None = None
    loss_gram: Tensor | None = None
    teacher_logits: Tensor | None = None
    student_logits: Tensor | None = None
    teacher_entropy: Tensor | None = None
    teacher_kl_uniform: Tensor | None = None
    teacher_temperature: float | None = None


class DINOv2(SelfDistillationMethod):
    """DINOv2-style method. Arguments as :class:`~dinokit.DINO`, plus:

    Args:
        n_patch_prototypes: prototypes of the iBOT patch head (8192).
        shared_head: one head for CLS and patch tokens (iBOT's choice) instead of two.
        centering: ``"sinkhorn"`` (DINOv2) or ``"ema"`` (DINO/iBOT centre).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        patch_loss_weight, koleo_weight: weights of the iBOT and KoLeo terms (1.0, 0.1).
        koleo_all_processes: nearest neighbours searched over every process's batch.
        mask_ratio: ratio of the fallback random mask when the batch brings none (0.3).
        n_register_tokens: register tokens of the ViT (0; DINOv3: 4).
    """

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_hidden_dim: int = 2048,
        projector_bottleneck_dim: int = 256,
        n_prototypes: int = 65536,
        temperature_student: float = 0.1,
        temperature_teacher_warmup: float = 0.04,
        temperature_teacher: float = 0.07,
        warmup_epochs_temperature_teacher: int = 30,
        center_momentum: float = 0.9,
        ema_decay_start: float = 0.996,
        ema_decay_end: float = 1.0,
        encoder_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        *,
        n_patch_prototypes: int = 8192,
        shared_head: bool = False,
        centering: str = "sinkhorn",
        sinkhorn_iterations: int = 3,
        patch_loss_weight: float = 1.0,
        koleo_weight: float = 0.1,
        koleo_all_processes: bool = False,
        mask_ratio: float = 0.3,
        n_register_tokens: int = 0,
        norm_last_layer: bool = True,
        total_steps: int | None = None,
        check_finite: bool = True,
    ):
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        if n_register_tokens < 0:
            raise ValueError(f"n_register_tokens must be >= 0, got {n_register_tokens}")
        if centering not in ("sinkhorn", "ema"):
            raise ValueError(f"centering must be 'sinkhorn' or 'ema', got {centering!r}")
        backbone = build_backbone(encoder_name, pretrained=pretrained, num_registers=n_register_tokens,
                                  encoder_kwargs=encoder_kwargs)
        if not backbone.supports_masking or not backbone.has_patch_tokens:
            raise TypeError(f"iBOT needs a ViT with patch tokens; {type(backbone).__name__} has none")
        if not backbone.has_cls_token:
            raise TypeError("DINOv2/DINOv3 need a ViT with a CLS token (class_token=True)")
        backbone.enable_mask_token()
        head_kw = dict(hidden_dim=projector_hidden_dim, bottleneck_dim=projector_bottleneck_dim,
                       norm_last_layer=norm_last_layer)
        modules = {"backbone": backbone, "head": DINOHead(backbone.embed_dim, n_prototypes, **head_kw)}
        if not shared_head:
            modules["patch_head"] = DINOHead(backbone.embed_dim, n_patch_prototypes, **head_kw)
        super().__init__(
            nn.ModuleDict(modules),
            ema_decay_start=ema_decay_start,
            ema_decay_end=ema_decay_end,
            temperature_teacher_warmup=temperature_teacher_warmup,
            temperature_teacher=temperature_teacher,
            warmup_epochs_temperature_teacher=warmup_epochs_temperature_teacher,
            total_steps=total_steps,
            check_finite=check_finite,
        )
        self.n_prototypes = n_prototypes
        self.shared_head, self.centering = shared_head, centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.patch_loss_weight, self.koleo_weight = patch_loss_weight, koleo_weight
        self.koleo_all_processes, self.mask_ratio = koleo_all_processes, mask_ratio
        self.student_temp = temperature_student
        self.dino_loss = DINOLoss(n_prototypes, temperature_student, center_momentum)
        self.ibot_loss = IBOTPatchLoss(n_prototypes if shared_head else n_patch_prototypes,
                                       temperature_student, centering, center_momentum, sinkhorn_iterations)

    def _patch_head(self, which: nn.ModuleDict) -> nn.Module:
        return which["head"] if self.shared_head else which["patch_head"]

    def _check_masks(self, masks: Tensor | None, n_images: int, n_patches: int, device) -> Tensor:
        if masks is None:
            return random_mask(n_images, n_patches, self.mask_ratio).to(device)
        if masks.shape != (n_images, n_patches) or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool [n_global * B, N] = [{n_images}, {n_patches}], got "
                             f"{masks.dtype} {tuple(masks.shape)}")
        return masks

    def _cls_teacher_probs(self, t_logits: Tensor, temp: float) -> Tensor:
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(t_logits.flatten(0, 1), temp, self.sinkhorn_iterations).view_as(t_logits)
        return self.dino_loss.teacher_probs(t_logits, temp)

    def _gram_term(self, s_patches: Tensor, global_images: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(weighted term added to the loss, detached raw Gram loss): DINOv3's hook; none here."""
        return None, None

    def forward(
        self,
        global_views: Sequence[Tensor] | None = None,
        local_views: Sequence[Tensor] | None = None,
        images: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> DINOv2Output:
        """Training step (``masks [n_global * B, N]``, True = masked) or the teacher embedding of
        ``images``."""
        if images is not None:
            emb = self.embed(images)
            return DINOv2Output(loss=emb.new_zeros(()), embedding=emb)
        g, lv = check_views(global_views, local_views, self.student_backbone.in_chans)
        if len({tuple(v.shape[-2:]) for v in g}) != 1:
            raise ValueError(f"DINOv2 needs global views of one size, got {[tuple(v.shape[-2:]) for v in g]}")
        n_g, b = len(g), g[0].shape[0]
        grid = self.student_backbone.grid_size(*g[0].shape[-2:])
        masks = self._check_masks(masks, n_g * b, grid[0] * grid[1], g[0].device)
        temp = self.teacher_temperature

        with torch.no_grad():
            t_out = forward_views(self.teacher_backbone, g)[0]
            t_cls_logits = self.teacher_head(t_out.cls).view(n_g, b, -1)
            t_patch_logits = self._patch_head(self.teacher)(t_out.patches[masks])
        s_g = forward_views(self.student_backbone, g, masks)[0]
        s_cls = [s_g.cls] + [o.cls for o in forward_views(self.student_backbone, lv)] if lv else [s_g.cls]
        s_cls_logits = self.student_head(torch.cat(s_cls)).view(n_g + len(lv), b, -1)
        s_patch_logits = self._patch_head(self.student)(s_g.patches[masks])
        self._check_finite("student_logits", s_cls_logits)

        t_cls_probs = self._cls_teacher_probs(t_cls_logits, temp)
        loss_cls = dino_cross_entropy(s_cls_logits, t_cls_probs, self.student_temp)
        t_patch_probs = self.ibot_loss.teacher_probs(t_patch_logits, temp)
        loss_patch = self.ibot_loss(s_patch_logits, t_patch_probs, masks)
        loss_koleo = torch.stack([koleo_loss(c, all_processes=self.koleo_all_processes)
                                  for c in s_g.cls.chunk(n_g)]).mean()
        loss = loss_cls + self.patch_loss_weight * loss_patch + self.koleo_weight * loss_koleo
        gram_term, loss_gram = self._gram_term(s_g.patches, torch.cat(g))
        if gram_term is not None:
            loss = loss + gram_term
        if self.training:
            if self.centering == "ema":
                self.dino_loss.update_center(t_cls_logits)
            self.ibot_loss.update_center(t_patch_logits)
        diag = teacher_diagnostics(t_cls_probs)
        return DINOv2Output(
            loss=loss,
            embedding=t_out.cls.detach(),
            loss_cls=loss_cls.detach(),
            loss_patch=loss_patch.detach(),
            loss_koleo=loss_koleo.detach(),
            loss_gram=loss_gram,
            teacher_logits=t_cls_logits.detach(),
            student_logits=s_cls_logits,
            teacher_entropy=diag.entropy,
            teacher_kl_uniform=diag.kl_uniform,
            teacher_temperature=temp,
        )
