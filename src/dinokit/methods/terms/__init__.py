"""Loss terms a method is composed of, one file per term, and their registry.

Adding a term: subclass :class:`LossTerm` in one file, decorate it with :func:`register_term`,
import it here; a method lists it (``ComposedMethod(..., terms=[...])``)."""

from dinokit.methods.terms.base import (
    FEATURES,
    GLOBAL_CLS,
    LOCAL_CLS,
    MASKED_PATCHES,
    STUDENT_PATCHES,
    TEACHER_GLOBAL,
    TERMS,
    LossTerm,
    StepFeatures,
    TermOutput,
    build_term,
    register_term,
)
from dinokit.methods.terms.dino_cls import DINOClsTerm
from dinokit.methods.terms.feature_distill import FeatureDistillTerm
from dinokit.methods.terms.gram import GramTerm
from dinokit.methods.terms.ibot import IBOTPatchTerm
from dinokit.methods.terms.koleo import KoLeoTerm

__all__ = [
    "FEATURES",
    "GLOBAL_CLS",
    "LOCAL_CLS",
    "MASKED_PATCHES",
    "STUDENT_PATCHES",
    "TEACHER_GLOBAL",
    "TERMS",
    "DINOClsTerm",
    "FeatureDistillTerm",
    "GramTerm",
    "IBOTPatchTerm",
    "KoLeoTerm",
    "LossTerm",
    "StepFeatures",
    "TermOutput",
    "build_term",
    "register_term",
]
