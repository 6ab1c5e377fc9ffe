"""MkDocs hook: the configuration page's key tables, generated from ``dinokit.config`` at build time.

A page holding the line ``<!-- config-keys -->`` gets it replaced by one table per config section
(every key of :func:`dinokit.config.all_keys`, with its default, its accepted values and its help
text), so the page cannot drift from the code. ``tests/test_docs.py`` checks the tables list
exactly ``all_keys()``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

MARKER = "<!-- config-keys -->"
_SRC = Path(__file__).resolve().parents[2] / "src"
if str(_SRC) not in sys.path:  # build the docs of this checkout, not of another installed copy
    sys.path.insert(0, str(_SRC))

from dinokit import config  # noqa: E402


def _cell(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|").replace("\n", " ")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    text = yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("...").strip()
    return f"`{text}`"


def _type(tp: Any) -> str:
    optional = False
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        tp = args[0] if len(args) == 1 else tp
    if get_origin(tp) is Literal:
        text = " \\| ".join(f"`{a}`" for a in get_args(tp))
    else:
        text = getattr(tp, "__name__", str(tp))
    return f"{text} or `null`" if optional else text


def _fields(section: str) -> tuple[str, dict[str, dataclasses.Field], dict[str, Any]]:
    cls = getattr(config, "SECTIONS", {}).get(section)
    if cls is None or not dataclasses.is_dataclass(cls):
        return "", {}, {}
    return ((cls.__doc__ or "").strip(), {f.name: f for f in dataclasses.fields(cls)},
            typing.get_type_hints(cls))


def _table(prefix: str, doc: str, names: list[str], fields: dict[str, dataclasses.Field],
           hints: dict[str, Any]) -> list[str]:
    out = [f"### `{prefix}`", ""]
    if doc:
        out += [_cell(" ".join(doc.split())), ""]
    out += ["| key | default | values | meaning |", "| --- | --- | --- | --- |"]
    for name in names:
        f = fields.get(name)
        default = _default(f) if f is not None else ""
        kind = _type(hints[name]) if name in hints else ""
        text = f.metadata.get("help", "") if f is not None else ""
        out.append(f"| `{prefix}.{name}` | {_cell(default)} | {kind} | {_cell(text)} |")
    return [*out, ""]


def _list_sections() -> dict[str, type]:
    """Config fields that hold a list of settings objects (e.g. ``stages``): name -> item class."""
    out = {}
    for name, tp in typing.get_type_hints(config.Config).items():
        args = get_args(tp)
        if get_origin(tp) is list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
            out[name] = args[0]
    return out


def config_reference() -> str:
    """Markdown tables of every config key, grouped by section in the order of ``all_keys()``, then
    one table per list section (the keys of each item, as ``stages[].name``)."""
    sections: dict[str, list[str]] = {}
    for key in config.all_keys():
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(name)
    out = []
    for section, names in sections.items():
        out += _table(section, *_fields(section)[:1], names, *_fields(section)[1:])
    for section, cls in _list_sections().items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out += _table(f"{section}[]", (cls.__doc__ or "").strip(), list(fields), fields,
                      typing.get_type_hints(cls))
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs event: fill in the tables where the marker stands."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, config_reference())
