"""Optional dependency groups: import a module of an extra, or fail with one line naming the extra.

``pip install "dinokit[onnx]"`` (onnx, onnxscript, onnxruntime), ``"dinokit[hf]"`` (transformers),
``"dinokit[geo]"`` (tifffile). The error is a :class:`~dinokit.config.ConfigError`, so the command
line prints it as one line and exits 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dinokit.config import ConfigError

#: extra -> the modules it installs (import names).
EXTRAS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "hf": ("transformers",), "geo": ("tifffile",)}


class MissingExtraError(ConfigError):
    """A feature needs an optional dependency group that is not installed; the message names it."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or raise :class:`MissingExtraError`: ``feature needs the 'extra' extra:
    pip install "dinokit[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{feature} needs {module}, part of the {extra!r} extra: "
                                f"pip install \"dinokit[{extra}]\" ({e.msg})") from None
