"""Backbones out of dinokit: ONNX graphs for serving stacks (:mod:`dinokit.interop.onnx`) and
Hugging Face ``transformers`` folders (:mod:`dinokit.interop.hf`). Each needs an optional extra
(``pip install "dinokit[onnx]"`` / ``"dinokit[hf]"``); :func:`require` names it when it is missing."""

from __future__ import annotations

from dinokit.interop.extras import MissingExtraError, require

__all__ = ["MissingExtraError", "require"]
