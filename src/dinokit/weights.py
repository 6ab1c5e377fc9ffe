"""Reading backbone weights from files: dinokit exports, training checkpoints, timm state dicts.

Every ``torch.load`` here uses ``weights_only=True``: nothing in a file is executed. Mismatches
are reported by key name, so a checkpoint from another model fails with an error that says which
keys are missing, unexpected or of another shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: Prefixes of the backbone inside a Lightning checkpoint of :class:`~dinokit.train.DINOModule`.
CHECKPOINT_PREFIXES = {
    "teacher": "method.teacher.backbone.",
    "student": "method.student.backbone.",
}


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message says why."""


def read_file(path: str | Path) -> dict[str, Any]:
    """Load a ``.safetensors`` file or a torch file (``weights_only=True``) into a dict."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as e:
            raise WeightsError(f"{p} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{p} is not a dinokit/timm checkpoint readable with weights_only=True: "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{p} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return obj


def backbone_state_dict(obj: Mapping[str, Any], which: str = "teacher") -> dict[str, Tensor]:
    """The backbone's tensors from a training checkpoint, an export or a plain state dict.

    Keys come back as the wrapped model's own keys (timm naming), plus dinokit's extra
    ``mask_token`` / ``register_tokens`` when present.
    """
    if which not in CHECKPOINT_PREFIXES:
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    sd: Mapping[str, Any] = obj
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    prefix = CHECKPOINT_PREFIXES[which]
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    elif any(k.startswith("method.") for k in tensors):
        raise WeightsError(f"checkpoint has no {which} backbone (no keys under {prefix!r})")
    out = {}
    for k, v in tensors.items():
        out[k[len("model."):] if k.startswith("model.") else k] = v
    if not out:
        raise WeightsError("no tensors found: this is not a dinokit or timm checkpoint")
    return out


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, Tensor], *,
                          source: str = "weights") -> None:
    """Load backbone weights (timm key names) into a dinokit :class:`Backbone`, strictly.

    Raises :class:`WeightsError` naming missing, unexpected and mis-shaped keys.
    """
    target = backbone.state_dict()
    mapped: dict[str, Tensor] = {}
    for k, v in state.items():
        key = k if k in target else f"model.{k}"
        mapped[key] = v
    missing = [k for k in target if k not in mapped and not k.endswith("_extra_state")]
    unexpected = [k for k in mapped if k not in target]
    shapes = [
        f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
        for k in mapped
        if k in target and mapped[k].shape != target[k].shape
    ]
    # A mask token the file lacks is fine: it is created fresh for masked training.
    missing = [k for k in missing if k != "mask_token"]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:8]}")
        raise WeightsError(
            f"{source} does not fit this backbone ({type(getattr(backbone, 'model', backbone)).__name__}): "
            + "; ".join(parts)
        )
    backbone.load_state_dict({k: mapped[k] for k in mapped}, strict=False)


def load_backbone_file(backbone: nn.Module, path: str | Path, which: str = "teacher") -> None:
    """Read ``path`` (export, checkpoint or timm weights) and load it into ``backbone``."""
    load_backbone_weights(backbone, backbone_state_dict(read_file(path), which), source=str(path))
