"""DINOv3 (Siméoni et al. 2025): DINOv2's terms (DINO CLS and iBOT with Sinkhorn-Knopp, KoLeo) on
a ViT with register tokens (4), prototypes without weight normalisation, and Gram anchoring
(:class:`~dinokit.methods.terms.GramTerm`) against a Gram teacher taken from the EMA teacher when
the Gram stage starts, or loaded from a file."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from dinokit.backbones import Backbone
from dinokit.methods.dino import DEFAULT_BACKBONE
from dinokit.methods.dinov2 import DINOv2, dinov2_terms
from dinokit.methods.registry import DINOV2_TRAINING, register_method
from dinokit.methods.seed_keywords import apply_seed_keywords
from dinokit.methods.terms import GramTerm, LossTerm
from dinokit.settings import MethodSettings
from dinokit.weights import backbone_state_dict, load_backbone_weights, read_file


class DINOv3(DINOv2):
    """DINOv3. The keywords are stable-pretraining's ``DINOv3`` (aliases of the settings named in
    brackets); every other knob is in ``settings``, whose ``None`` fields are DINOv3's official
    choices (4 register tokens, untied heads, prototypes without weight norm, EMA momentum 0.992,
    the teacher temperature warmed up 0.04 -> 0.07 per step over 30 epochs). A keyword left at
    its default defers to ``settings``.

    Args:
        encoder_name: as :class:`~dinokit.DINO` [``backbone.name``].
        n_register_tokens: register tokens (None = official 4) [``backbone.n_registers``].
        koleo_weight: weight of KoLeo (0.1) [``koleo.weight``].
        projector_hidden_dim, projector_bottleneck_dim: head widths (2048, 256) [``heads.*``].
        n_cls_prototypes, n_patch_prototypes: prototypes of the CLS and patch heads (65536 each,
            as the official config) [``dino.n_prototypes``, ``ibot.n_prototypes``].
        mask_ratio: ratio of the fallback random masks when the batch brings none (0.3).
        patch_loss_weight: weight of the iBOT term (1.0) [``ibot.weight``].
        temperature_student: ``tau_s`` (0.1) [``dino/ibot.student_temperature``].
        temperature_teacher: teacher temperature after the warm-up (0.07) [``teacher.temperature``];
            a constant temperature from the first step is ``settings.teacher.warmup_epochs=0``.
        ema_decay_start, ema_decay_end: teacher EMA momentum (None = official 0.992; 1.0).
        image_size: the input size the model is meant for (recorded as ``image_size``; crops of
            any multiple of the patch size are accepted).
        pretrained: load published weights for a named encoder [``backbone.pretrained``].
        settings: :class:`~dinokit.settings.MethodSettings`: Gram anchoring is ``settings.gram``
            (``weight`` 0 = off, the official start step, refreshes and loss options), the
            backbone's ``kwargs`` for ``timm.create_model``, and the rest.
    """

    method_name = "dinov3"

    def __init__(self, encoder_name: str | nn.Module = "vit_small_patch16_224",
                 n_register_tokens: int | None = None, koleo_weight: float = 0.1,
                 projector_hidden_dim: int = 2048, projector_bottleneck_dim: int = 256,
                 n_cls_prototypes: int = 65536, n_patch_prototypes: int = 65536, mask_ratio: float = 0.3,
                 patch_loss_weight: float = 1.0, temperature_student: float = 0.1,
                 temperature_teacher: float = 0.07, ema_decay_start: float | None = None,
                 ema_decay_end: float = 1.0, image_size: int = 224, pretrained: bool = False, *,
                 settings: MethodSettings | None = None):
        given = None if isinstance(encoder_name, str) else encoder_name
        keywords = {
            "backbone.name": (encoder_name if given is None else DEFAULT_BACKBONE, DEFAULT_BACKBONE),
            "backbone.n_registers": (n_register_tokens, None),
            "koleo.weight": (koleo_weight, 0.1),
            "heads.hidden_dim": (projector_hidden_dim, 2048),
            "heads.bottleneck_dim": (projector_bottleneck_dim, 256),
            "dino.n_prototypes": (n_cls_prototypes, 65536),
            "ibot.n_prototypes": (n_patch_prototypes, 65536),
            "ibot.weight": (patch_loss_weight, 1.0),
            "dino.student_temperature": (temperature_student, 0.1),
            "ibot.student_temperature": (temperature_student, 0.1),
            "teacher.temperature": (temperature_teacher, 0.07),
            "teacher.momentum": (ema_decay_start, None),
            "teacher.final_momentum": (ema_decay_end, 1.0),
            "backbone.pretrained": (pretrained, False),
        }
        names = {"backbone.name": "encoder_name", "backbone.n_registers": "n_register_tokens",
                 "koleo.weight": "koleo_weight", "heads.hidden_dim": "projector_hidden_dim",
                 "heads.bottleneck_dim": "projector_bottleneck_dim", "dino.n_prototypes": "n_cls_prototypes",
                 "ibot.n_prototypes": "n_patch_prototypes", "ibot.weight": "patch_loss_weight",
                 "dino.student_temperature": "temperature_student",
                 "ibot.student_temperature": "temperature_student",
                 "teacher.temperature": "temperature_teacher", "teacher.momentum": "ema_decay_start",
                 "teacher.final_momentum": "ema_decay_end", "backbone.pretrained": "pretrained"}
        self._build(given, apply_seed_keywords(settings, keywords, names), mask_ratio)
        self.image_size = image_size
        self.gram_weight = self.settings.gram.weight

    def make_terms(self, s: MethodSettings) -> list[LossTerm]:
        terms = dinov2_terms(s)
        if s.gram.weight > 0:
            terms.append(GramTerm(s.gram))
        return terms

    @property
    def gram_term(self) -> GramTerm | None:
        for t in self.terms:
            if isinstance(t, GramTerm):
                return t
        return None

    @property
    def gram_teacher(self) -> nn.Module | None:
        """The frozen Gram teacher backbone (None without Gram anchoring or with the EMA teacher)."""
        t = self.gram_term
        return None if t is None else t.gram_teacher

    def snapshot_gram_teacher(self) -> None:
        """Load the Gram teacher from the current EMA teacher now."""
        t = self._require_gram()
        t.load_from(self.teacher_backbone)

    def load_gram_teacher(self, source: str | Path | dict[str, Tensor]) -> None:
        """Gram teacher weights from a file (export, checkpoint, timm or Meta state dict) or a
        state dict; a backbone of another architecture fails with the mismatched keys named."""
        t = self._require_gram()
        if t.gram_teacher is None:
            raise ValueError("gram_ema_teacher=True uses the EMA teacher; there is no Gram teacher to load")
        state = source if isinstance(source, dict) else backbone_state_dict(read_file(source))
        name = "Gram teacher state dict" if isinstance(source, dict) else str(source)
        load_backbone_weights(t.gram_teacher, state, source=name)
        t.initialized.fill_(True)
        t._initialized = True

    def _require_gram(self) -> GramTerm:
        t = self.gram_term
        if t is None:
            raise ValueError("this DINOv3 has no Gram anchoring (settings.gram.weight=0)")
        return t


@register_method(
    "dinov3", sections=("dino", "ibot", "koleo", "gram"), needs_masks=True,
    official={"teacher.momentum": 0.992, "teacher.warmup_unit": "step", "teacher.centering": "sinkhorn",
              "heads.norm_last_layer": False, "heads.weight_norm": False, "ibot.shared_head": False,
              "backbone.n_registers": 4},
    training={"no_decay_rule": "dinov3", **DINOV2_TRAINING},
    summary="DINOv3 (Siméoni et al. 2025): DINOv2 + registers + Gram anchoring",
    drop_path_uniform=True, drop_path_subset_above=0.0,
)
def dinov3(backbone: Backbone, settings: MethodSettings) -> DINOv3:
    """DINOv3 from its settings (``dino``, ``ibot``, ``koleo``, ``gram``, ``heads``, ``teacher``)."""
    return DINOv3(backbone, settings=settings)
