"""What a loss term is: a small module that declares the features it consumes, the heads it owns
and its weight, and turns the features of one step into a scalar.

A method is a backbone, the heads of its terms and a list of terms (see
:class:`~dinokit.methods.composed.ComposedMethod`); the method computes each feature once (teacher
pass, student passes, masked-token selection) and hands the same :class:`StepFeatures` to every term.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from dinokit.backbones import BackboneOutput
from dinokit.clock import Stage, TermTiming

#: Features a term may consume; the method computes only the union of what its terms declare.
GLOBAL_CLS = "global_cls"  # student CLS of the global crops, [n_global * B, D]
LOCAL_CLS = "local_cls"  # student CLS of the local crops, [n_local * B, D]
TEACHER_GLOBAL = "teacher_global"  # teacher backbone output on the unmasked global crops
MASKED_PATCHES = "masked_patches"  # student/teacher patch tokens at the iBOT mask indices
STUDENT_PATCHES = "student_patches"  # student patch tokens of the (masked) global crops
FEATURES = frozenset({GLOBAL_CLS, LOCAL_CLS, TEACHER_GLOBAL, MASKED_PATCHES, STUDENT_PATCHES})


@dataclass
class StepFeatures:
    """Everything the terms of one step read, computed once by the method.

    Rows are view-major: row ``v * B + b`` is crop ``v`` of image ``b``.
    """

    n_global: int
    batch_size: int
    teacher_temperature: float
    step: int
    training: bool
    student_global: BackboneOutput  # cls [n_global * B, D], patches [n_global * B, N, D] (masked)
    global_images: Tensor | None = None  # [n_global * B, C, H, W] when a term reads patches
    student_local_cls: Tensor | None = None  # [n_local * B, D]
    teacher_global: BackboneOutput | None = None  # no grad, unmasked
    masks: Tensor | None = None  # bool [n_global * B, N], True = masked
    mask_indices: Tensor | None = None  # long [U], flat indices into [n_global * B * N]
    mask_weights: Tensor | None = None  # float [U], 1 / masked count of the crop; 0 = padding
    cache: dict[str, Any] = field(default_factory=dict)  # values shared between terms of a step
    stage: Stage | None = None  # the active stage (terms read their stage overrides from it)

    @property
    def n_local(self) -> int:
        return 0 if self.student_local_cls is None else self.student_local_cls.shape[0] // self.batch_size


@dataclass
class TermOutput:
    """A term's unweighted ``loss`` and what it reports (detached tensors or floats); ``outputs``
    may carry typed-output fields such as ``student_logits``."""

    loss: Tensor
    outputs: dict[str, Any] = field(default_factory=dict)


class LossTerm(nn.Module):
    """Base of every loss term.

    Subclasses set ``name`` (the loss is reported as ``loss_<name>``), ``section`` (the config
    section of its settings and the key of its weight in the clock's values and a stage's
    ``weights``) and ``consumes`` (a subset of :data:`FEATURES`), create their heads in
    :meth:`make_heads`, and implement :meth:`forward`. ``weight`` multiplies the loss; the clock
    gives each step's weight (:meth:`timing`: a term may start late and ramp up), and a weight of 0
    at a step skips the term's computation there.
    """

    name: ClassVar[str] = "term"
    section: ClassVar[str] = "term"
    consumes: ClassVar[frozenset[str]] = frozenset()
    #: the term reads only the ``cls`` of the backbone outputs it gets (no patches, no registers);
    #: when every active term does, the method asks the backbones for the CLS token only (a ViT then
    #: skips the dead rows of its last block). False (the safe default) for a term that may read more.
    cls_only: ClassVar[bool] = False

    def __init__(self, weight: float = 1.0):
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"{self.name} weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def timing(self) -> TermTiming:
        """The term's weight and when it starts (what the clock schedules)."""
        return TermTiming(self.weight)

    def make_heads(self, embed_dim: int) -> dict[str, nn.Module]:
        """Heads this term adds to the student (and, copied, to the teacher)."""
        return {}

    def forward(self, features: StepFeatures, student: nn.ModuleDict,
                teacher: nn.ModuleDict) -> TermOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_teacher_update(self, step: int, teacher_backbone: nn.Module) -> None:
        """Called after the EMA update of optimiser step ``step`` (e.g. to refresh a Gram teacher)."""

    @property
    def needs_masks(self) -> bool:
        return MASKED_PATCHES in self.consumes


#: Registered term classes by name: ``build_term(name, **kwargs)`` makes one.
TERMS: dict[str, type[LossTerm]] = {}


def register_term(cls: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: make a term available by its ``name``."""
    unknown = set(cls.consumes) - FEATURES
    if unknown:
        raise ValueError(f"term {cls.__name__} consumes unknown features {sorted(unknown)}; "
                         f"known: {sorted(FEATURES)}")
    if cls.name in TERMS and TERMS[cls.name] is not cls:
        raise ValueError(f"a loss term named {cls.name!r} is already registered ({TERMS[cls.name].__name__})")
    TERMS[cls.name] = cls
    return cls


def build_term(name: str, **kwargs: Any) -> LossTerm:
    if name not in TERMS:
        raise KeyError(f"unknown loss term {name!r}; registered: {sorted(TERMS)}")
    return TERMS[name](**kwargs)
