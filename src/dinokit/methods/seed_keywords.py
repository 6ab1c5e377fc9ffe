"""Seed-facing keywords: the constructor names of the systems dinokit covers (stable-pretraining's
``DINO`` / ``DINOv3``, nidl's estimator) as aliases of the one name of each knob.

A seed-facing constructor takes its documented keywords and a :class:`~dinokit.settings.MethodSettings`.
A keyword left at its documented default defers to ``settings``; one given another value sets its
knob; a keyword and a ``settings`` value that both differ from their defaults and disagree raise.
Nothing else changes with the name used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dinokit.settings import MethodSettings

#: ``(value given, documented default)`` per ``"section.key"``.
Keywords = Mapping[str, tuple[Any, Any]]


def apply_seed_keywords(settings: MethodSettings | None, keywords: Keywords,
                        names: Mapping[str, str]) -> MethodSettings:
    """``settings`` (or the defaults) with the seed keywords applied.

    Args:
        settings: the caller's settings object, or None.
        keywords: ``"section.key" -> (value, documented default)``.
        names: ``"section.key" -> keyword name`` (for the error message).
    """
    base = settings if settings is not None else MethodSettings()
    if not isinstance(base, MethodSettings):
        raise TypeError(f"settings must be a dinokit.settings.MethodSettings, got {type(base).__name__}")
    defaults = MethodSettings()
    sections = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    for key, (value, documented) in keywords.items():
        if _same(value, documented):
            continue
        section, name = key.split(".")
        current = getattr(sections[section], name)
        if not _same(current, getattr(getattr(defaults, section), name)) and not _same(current, value):
            raise ValueError(f"{names[key]}={value!r} and settings.{key}={current!r} disagree; give one")
        sections[section] = dataclasses.replace(sections[section], **{name: value})
    return MethodSettings(**sections)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b and type(a) is type(b) if isinstance(a, bool) or isinstance(b, bool) else a == b
