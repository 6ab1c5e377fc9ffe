"""Griffe extension: Sphinx roles in the docstrings (``:class:`~dinokit.x.Y```) shown as code.

The docstrings name other objects with Sphinx roles, which Markdown would print as they are. This
turns each into an inline code span (the last dotted part when the target starts with ``~``, as
Sphinx does), so the API pages read cleanly whatever the role points at.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|obj|exc|const):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def plain_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by an inline code span."""
    return ROLE.sub(_code, text)


class RSTRoles(Extension):
    """Rewrites the roles of every loaded object's docstring."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)
