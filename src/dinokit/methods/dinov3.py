"""DINOv3 (Siméoni et al. 2025): DINOv2's terms (DINO CLS and iBOT with Sinkhorn-Knopp, KoLeo) on
a ViT with register tokens (4), prototypes without weight normalisation, and Gram anchoring
(:class:`~dinokit.methods.terms.GramTerm`) against a Gram teacher taken from the EMA teacher when
the Gram stage starts, or loaded from a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dinokit.methods.dinov2 import DINOv2
from dinokit.methods.terms import GramTerm

#: Keywords only seed 004's DINOv3 takes; called with them (and no warm-up argument), the teacher
#: temperature stays at ``temperature_teacher`` from the start, as in that seed.
SEED_ONLY_KEYWORDS = ("n_cls_prototypes", "image_size")


class DINOv3(DINOv2):
    """DINOv3. Arguments as :class:`DINOv2` (keyword-only after ``encoder_name``; defaults from
    the official config: 4 register tokens, untied heads, no weight norm), plus:

    Args:
        n_cls_prototypes: seed 004's name for ``n_prototypes``.
        image_size: the input size the model is meant for (seed 004; kept as ``image_size``).
        gram_weight: weight of Gram anchoring (0 = off; then no Gram teacher exists).
        gram_start_step: the Gram stage's first step: the Gram teacher is loaded from the EMA
            teacher here (official ``it_load_ema_teacher``) unless a file gives it.
        gram_ramp_steps: ramp the weight up linearly over these steps (0 = official).
        gram_refresh_every, gram_first_refresh_step, gram_max_refreshes: refresh the Gram teacher
            from the EMA teacher (official ``update_frequency``/``it_first_update``/``max_updates``).
        gram_ema_teacher, gram_img_level, gram_remove_neg, gram_remove_only_teacher_neg,
            gram_normalized, gram_teacher_size: see :class:`~dinokit.methods.terms.GramTerm`.
    """

    # DINOv3's default schedulers (train.py, CosineScheduler) warm up with np.linspace like DINOv2;
    # its ``schedules:`` configs (linear_warmup_cosine_decay) end one step later: set
    # ``temperature_warmup_endpoint = False`` on an instance's class to follow those.

    def __init__(self, encoder_name: str | nn.Module = "vit_small_patch16_224", *,
                 n_register_tokens: int = 4, n_prototypes: int | None = None,
                 n_cls_prototypes: int | None = None, image_size: int | None = None,
                 weight_norm: bool = False,
                 temperature_teacher_warmup: float | None = None,
                 warmup_epochs_temperature_teacher: int | None = None,
                 temperature_teacher: float = 0.07,
                 gram_weight: float = 0.0, gram_start_step: int = 0, gram_ramp_steps: int = 0,
                 gram_refresh_every: int | None = None, gram_first_refresh_step: int = 0,
                 gram_max_refreshes: int | None = None, gram_ema_teacher: bool = False,
                 gram_img_level: bool = False, gram_remove_neg: bool = False,
                 gram_remove_only_teacher_neg: bool = False, gram_normalized: bool = True,
                 gram_teacher_size: int | None = None, **kwargs: Any):
        if n_prototypes is not None and n_cls_prototypes is not None and n_prototypes != n_cls_prototypes:
            raise ValueError(f"n_prototypes ({n_prototypes}) and its alias n_cls_prototypes "
                             f"({n_cls_prototypes}) disagree")
        k = n_prototypes if n_prototypes is not None else n_cls_prototypes
        seed_call = (n_cls_prototypes is not None or image_size is not None)
        constant_temp = seed_call and temperature_teacher_warmup is None and \
            warmup_epochs_temperature_teacher is None
        if temperature_teacher_warmup is None:
            temperature_teacher_warmup = temperature_teacher if constant_temp else 0.04
        if warmup_epochs_temperature_teacher is None:
            warmup_epochs_temperature_teacher = 0 if constant_temp else 30
        gram: list[GramTerm] = []
        if gram_weight > 0:
            gram = [GramTerm(gram_weight, start_step=gram_start_step, ramp_steps=gram_ramp_steps,
                             refresh_every=gram_refresh_every, first_refresh_step=gram_first_refresh_step,
                             max_refreshes=gram_max_refreshes, ema_teacher=gram_ema_teacher,
                             img_level=gram_img_level, remove_neg=gram_remove_neg,
                             remove_only_teacher_neg=gram_remove_only_teacher_neg,
                             normalized=gram_normalized, teacher_size=gram_teacher_size)]
        elif gram_weight < 0:
            raise ValueError(f"gram_weight must be >= 0, got {gram_weight}")
        super().__init__(encoder_name, n_prototypes=65536 if k is None else k,
                         n_register_tokens=n_register_tokens, weight_norm=weight_norm,
                         temperature_teacher_warmup=temperature_teacher_warmup,
                         temperature_teacher=temperature_teacher,
                         warmup_epochs_temperature_teacher=warmup_epochs_temperature_teacher,
                         extra_terms=[*kwargs.pop("extra_terms", []), *gram], **kwargs)
        self.image_size = image_size
        self.gram_weight = gram_weight

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
        from dinokit.weights import backbone_state_dict, load_backbone_weights, read_file

        t = self._require_gram()
        if t.gram_teacher is None:
            raise ValueError("gram_ema_teacher=True uses the EMA teacher; there is no Gram teacher to load")
        state = source if isinstance(source, dict) else backbone_state_dict(read_file(source))
        name = "Gram teacher state dict" if isinstance(source, dict) else str(source)
        load_backbone_weights(t.gram_teacher, state, source=name)
        t.initialized.fill_(True)
        t._initialized = True

    def gram_weight_now(self) -> float:
        t = self.gram_term
        return 0.0 if t is None else t.weight_at(self.step)

    def _require_gram(self) -> GramTerm:
        t = self.gram_term
        if t is None:
            raise ValueError("this DINOv3 has no Gram anchoring (gram_weight=0)")
        return t
