"""Reading backbone weights from files: dinokit exports, training checkpoints, timm state dicts and
Meta's official DINOv2 / DINOv3 layouts (hub ``.pth`` backbones and ``teacher_checkpoint.pth``).

Every ``torch.load`` here uses ``weights_only=True``: nothing in a file is executed. Files are
checked against the model before anything is copied, and mismatches are reported by key name and
shape, so a checkpoint of another architecture or size fails without leaving a model half-loaded.
Meta's key layout is converted to timm's with timm's own converters (``checkpoint_filter_fn`` of
``vision_transformer`` for DINOv2, of ``eva`` for DINOv3); the iBOT mask token of those files is
kept for continued masked training.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models import adapt_input_conv, eva, vision_transformer
from torch import Tensor, nn

#: Prefixes of the backbone inside a Lightning checkpoint of :class:`~dinokit.train.DINOModule`.
CHECKPOINT_PREFIXES = {
    "teacher": "method.teacher.backbone.",
    "student": "method.student.backbone.",
}
#: Prefixes of the backbone in Meta's training checkpoints (``{"model": {...}}``).
META_PREFIXES = {"teacher": "teacher.backbone.", "student": "student.backbone."}


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message says why."""


def load_failure(e: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, on one line. A refused pickle is named
    by the global it asks for, without torch's advice to load the file unsafely."""
    text = str(e)
    if "Weights only load failed" in text:
        glob, op = re.search(r"GLOBAL ([\w.]+)", text), re.search(r"Unsupported operand (\d+)", text)
        what = (f"pickled Python objects ({glob.group(1)})" if glob else
                f"pickle operations (operand {op.group(1)})" if op else "pickled content")
        return f"it holds {what} that a weights-only load refuses; dinokit never runs code from a file"
    return f"{type(e).__name__}: {' '.join(text.split())[:200]}"


def read_file(path: str | Path) -> dict[str, Any]:
    """Load a ``.safetensors`` file or a torch file (``weights_only=True``) into a dict."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        try:
            return dict(load_file(str(p)))
        except Exception as e:
            raise WeightsError(
                f"{p} is not a readable safetensors file (corrupt or truncated?): {e}"
            ) from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{p} is not a dinokit/timm checkpoint readable with weights_only=True: "
                           f"{load_failure(e)}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{p} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return obj


def _tensors(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    sd: Mapping[str, Any] = obj
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            sd = obj[key]
            break
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def kind_of(obj: Mapping[str, Any]) -> str:
    """``"dinokit_checkpoint"``, ``"meta_checkpoint"`` (teacher/student + heads) or ``"backbone"``."""
    if isinstance(obj.get("teacher"), Mapping):
        return "meta_checkpoint"
    keys = _tensors(obj)
    if any(k.startswith("method.") for k in keys):
        return "dinokit_checkpoint"
    if any(k.startswith(p) for k in keys for p in META_PREFIXES.values()):
        return "meta_checkpoint"
    return "backbone"


def layout_of(state: Mapping[str, Tensor]) -> str:
    """Key layout of a backbone state dict: ``"meta_dinov3"``, ``"meta_dinov2"`` or ``"timm"``.

    Meta's files carry ``storage_tokens`` / ``rope_embed.periods`` (DINOv3) or a ``[1, D]``
    ``mask_token`` (DINOv2; dinokit's own mask token is ``[1, 1, D]``).
    """
    if "storage_tokens" in state or "rope_embed.periods" in state:
        return "meta_dinov3"
    if any(k.endswith(".ls1.gamma") for k in state) and "pos_embed" not in state and "cls_token" in state:
        return "meta_dinov3"
    mask = state.get("mask_token")
    if (mask is not None and mask.ndim == 2) or any(".mlp.w12." in k for k in state):
        return "meta_dinov2"
    return "timm"


def describe(obj: Mapping[str, Any]) -> str:
    """What a loaded file holds, in words (for errors)."""
    kind = kind_of(obj)
    if kind == "dinokit_checkpoint":
        return "a dinokit training checkpoint (student, teacher, heads and optimiser state)"
    if kind == "meta_checkpoint":
        return "an official DINOv2/DINOv3 training checkpoint (teacher/student backbone and heads)"
    t = _tensors(obj)
    if t:
        names = {"meta_dinov3": "Meta's DINOv3", "meta_dinov2": "Meta's DINOv2", "timm": "timm"}
        return f"backbone-only weights in {names[layout_of(t)]} layout ({len(t)} tensors)"
    return "no tensors"


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a dinokit training checkpoint; any other file fails saying what it holds."""
    obj = read_file(path)
    if kind_of(obj) == "dinokit_checkpoint" and not (obj.get("dinokit") or {}).get("config"):
        raise WeightsError(f"{path} is not a dinokit training checkpoint: it has method weights but no run "
                           "config inside (was it saved by another loop?)")
    if kind_of(obj) != "dinokit_checkpoint":
        raise WeightsError(
            f"{path} holds {describe(obj)}; expected a dinokit training checkpoint (a run directory or "
            "its checkpoints/*.ckpt, with the run config inside). Backbone weights go to "
            "model.init_weights=<file> instead."
        )
    return obj


def distilled_student_prefix(obj: Mapping[str, Any]) -> str | None:
    """The key prefix of the first student's backbone in a distillation run's checkpoint (the
    network it deploys); None for any other file."""
    tensors = _tensors(obj)
    if not any(k.startswith("method.students.") for k in tensors):
        return None
    config = (obj.get("dinokit") or {}).get("config") or {}
    students = (config.get("model") or {}).get("students") or []
    names = [s["name"] for s in students if isinstance(s, Mapping) and "name" in s] or ["student"]
    return f"method.students.{names[0]}.backbone."


def backbone_state_dict(obj: Mapping[str, Any], which: str = "teacher") -> dict[str, Tensor]:
    """The backbone's tensors from a training checkpoint, an export or a plain state dict; from a
    distillation run's checkpoint, its first student's (the network it deploys), whatever
    ``which`` says.

    Keys come back as the wrapped model's own keys (timm naming, or Meta's for official files),
    plus dinokit's extra ``mask_token`` / ``register_tokens`` when present.
    """
    if which not in CHECKPOINT_PREFIXES:
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if isinstance(obj.get(which), Mapping) and kind_of(obj) == "meta_checkpoint":
        sd = {k: v for k, v in obj[which].items() if isinstance(v, Tensor)}
        out = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        if not out:
            raise WeightsError(f"the official checkpoint's {which!r} entry has no 'backbone.' tensors")
        return out
    tensors = _tensors(obj)
    student = distilled_student_prefix(obj)
    if student is not None:  # a distillation run: what it deploys, its (first) student
        return backbone_state_dict({k[len(student):]: v for k, v in tensors.items() if k.startswith(student)})
    for prefixes in (CHECKPOINT_PREFIXES, META_PREFIXES):
        prefix = prefixes[which]
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    else:
        if any(k.startswith("method.") for k in tensors):
            raise WeightsError(
                f"checkpoint has no {which} backbone (no keys under {CHECKPOINT_PREFIXES[which]!r})"
            )
    out = {}
    for k, v in tensors.items():
        out[k[len("model."):] if k.startswith("model.") else k] = v
    if not out:
        raise WeightsError("no tensors found: this is not a dinokit, timm or DINOv2/DINOv3 checkpoint")
    return out


def to_timm_layout(state: Mapping[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """Convert Meta's DINOv2/DINOv3 keys to the backbone's timm keys (timm layout passes through).

    The file's iBOT mask token is kept when the backbone has one; a classifier the backbone was
    built without (``num_classes=0``) is dropped.
    """
    state = dict(state)
    model = getattr(backbone, "model", backbone)
    layout = layout_of(state)
    has_mask = getattr(backbone, "mask_token", None) is not None
    mask = state.get("mask_token")
    if layout != "timm":
        # Meta's training checkpoints chunk the blocks (``blocks.<chunk>.<index>.``; index is global)
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
        checkpoint_filter_fn = (eva if layout == "meta_dinov3" else vision_transformer).checkpoint_filter_fn
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # timm prints keys it skips
                state = dict(checkpoint_filter_fn(dict(state), model))
        except Exception as e:
            raise WeightsError(
                f"cannot convert {layout} weights to {type(model).__name__}: {type(e).__name__}: {e}"
            ) from None
        state.pop("mask_token", None)
        if mask is not None and has_mask:
            state["mask_token"] = mask.reshape(1, 1, -1)
    elif mask is not None and not has_mask:
        state.pop("mask_token")
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(classifier, str) and getattr(model, "num_classes", None) == 0:
        state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    return state


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's weights: every tensor of its state dict with its name, dtype and
    shape, in name order. Identifies a frozen network that training checkpoints leave out (a
    distillation's teacher) without storing it; equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()


def fit_problems(module: nn.Module, state: Mapping[str, Tensor], *, optional: tuple[str, ...] = (),
                 strip: str = "") -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``state`` against ``module`` (empty if it fits);
    ``strip`` is a prefix left out of the key names shown."""
    target = module.state_dict()

    def name(k: str) -> str:
        return k[len(strip):] if strip and k.startswith(strip) else k

    missing = [name(k) for k in target
               if k not in state and not k.endswith("_extra_state") and k not in optional]
    unexpected = [name(k) for k in state if k not in target]
    shapes = [
        f"{name(k)}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        parts.append(f"shape mismatches {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
    return parts


def left_out_prefixes(checkpoint: Mapping[str, Any]) -> tuple[str, ...]:
    """The state-dict key prefixes of the networks a training checkpoint left out on purpose (a
    distillation's frozen teacher, recorded with its fingerprint under ``dinokit.external``): the
    run rebuilds them from its config."""
    return tuple(f"method.{name}." for name in ((checkpoint.get("dinokit") or {}).get("external") or {}))


def first_mismatch(module: nn.Module, state: Mapping[str, Any],
                   left_out: tuple[str, ...] = ()) -> tuple[str | None, int]:
    """The first key of ``state`` that a strict ``module.load_state_dict`` would reject (unexpected,
    mis-shaped, or missing, except under the ``left_out`` prefixes), in words, and how many keys
    are wrong in all."""
    target = module.state_dict()
    problems = []
    for k, v in state.items():
        if k not in target:
            problems.append(f"unexpected key {k}")
        elif isinstance(v, Tensor) and tuple(v.shape) != tuple(target[k].shape):
            problems.append(f"{k}: {tuple(v.shape)} in the file, {tuple(target[k].shape)} in the model")
    problems += [f"missing key {k}" for k in target if k not in state and not k.endswith("_extra_state")
                 and not (left_out and k.startswith(left_out))]
    return (problems[0] if problems else None), len(problems)


def check_checkpoint_fits(path: str | Path, module: nn.Module) -> None:
    """Fail, on one line naming ``path`` and the first mismatching key, when a training
    checkpoint's weights do not fit ``module`` (a model built from another config)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise WeightsError(f"{path} does not load: {load_failure(e)}") from None
    # the networks left out are checked by their fingerprints when the checkpoint is loaded
    first, n = first_mismatch(module, obj.get("state_dict") or {}, left_out_prefixes(obj))
    if first is not None:
        more = f" (and {n - 1} more)" if n > 1 else ""
        raise WeightsError(f"{path} does not fit the model of this config: {first}{more}")


def _map_to_backbone(backbone: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    target = backbone.state_dict()
    return {(k if k in target else f"model.{k}"): v for k, v in state.items()}


def adapt_input_channels(backbone: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weights of another input channel count (RGB weights for a 4- or 13-band backbone): the first
    convolution of the model (patch embedding, CNN stem) adapted as timm adapts published weights to
    ``in_chans`` (``timm.models.adapt_input_conv``: summed for 1 channel, the RGB filters repeated
    over the channels and scaled by 3 / channels otherwise); every other tensor unchanged."""
    target = backbone.state_dict()
    first = next((k for k, v in target.items() if v.ndim == 4 and k.endswith("weight")), None)
    w = state.get(first) if first is not None else None
    t = target[first] if first is not None else None
    if w is None or t is None or w.ndim != 4 or w.shape[1] == t.shape[1] or w.shape[0] != t.shape[0] \
            or w.shape[2:] != t.shape[2:]:
        return dict(state)
    return {**state, first: adapt_input_conv(int(t.shape[1]), w)}


def check_backbone_weights(backbone: nn.Module, state: Mapping[str, Tensor], *, source: str = "weights",
                           adapt_channels: bool = False) -> dict[str, Tensor]:
    """Convert and check ``state`` against ``backbone``; returns the keys to load, or raises.
    ``adapt_channels``: weights of another input channel count are adapted
    (:func:`adapt_input_channels`; starting weights), else they are a shape mismatch."""
    mapped = _map_to_backbone(backbone, to_timm_layout(state, backbone))
    if adapt_channels:
        mapped = adapt_input_channels(backbone, mapped)
    # A mask token the file lacks is fine: it is created fresh for masked training.
    problems = fit_problems(backbone, mapped, optional=("mask_token",), strip="model.")
    if problems:
        raise WeightsError(
            f"{source} does not fit this backbone ({type(getattr(backbone, 'model', backbone)).__name__}): "
            + "; ".join(problems)
        )
    return mapped


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, Tensor], *,
                          source: str = "weights") -> None:
    """Load backbone weights (timm or Meta key names) into a dinokit :class:`Backbone`, strictly.

    Raises :class:`WeightsError` naming missing, unexpected and mis-shaped keys; nothing is
    copied then.
    """
    backbone.load_state_dict(check_backbone_weights(backbone, state, source=source), strict=False)


def load_backbone_file(backbone: nn.Module, path: str | Path, which: str = "teacher") -> None:
    """Read ``path`` (export, checkpoint, timm or Meta weights) and load it into ``backbone``."""
    load_backbone_weights(backbone, backbone_state_dict(read_file(path), which), source=str(path))


def gives_heads(path: str | Path | None) -> bool:
    """Whether ``model.init_weights=path`` starts the heads too (a dinokit training checkpoint),
    read from the file's key names without loading its tensors."""
    if not path:
        return False
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as f:
                return any(k.startswith("method.") for k in f.keys())  # noqa: SIM118 (a safe_open handle)
        except Exception as e:
            raise WeightsError(f"{p} is not a readable safetensors file (corrupt or truncated?): "
                               f"{e}") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file (mmap needs one): read it whole
        obj = read_file(p)
    return (isinstance(obj, dict) and kind_of(obj) == "dinokit_checkpoint"
            and distilled_student_prefix(obj) is None)  # a distillation's student starts without heads


def apply_init_weights(method: nn.Module, cfg: Any) -> None:
    """Start a method from ``cfg.model.init_weights``; apply ``cfg.backbone.freeze_patch_embed`` and
    ``cfg.backbone.grad_checkpointing`` (activation checkpointing of the student backbone).

    A backbone file (timm, Meta DINOv2/DINOv3, dinokit export, the teacher of an official
    training checkpoint, or the first student of a dinokit distillation run) goes into the
    student, the teacher and, for DINOv3 with Gram anchoring, the Gram teacher (unless
    ``gram.teacher_path`` names its own); the heads start fresh. RGB weights for a backbone of
    other input channels are adapted as timm adapts them (:func:`adapt_input_channels`). A dinokit
    training checkpoint (not a distillation's) also gives its heads. Everything is checked before
    anything is copied.
    """
    path = cfg.model.init_weights
    gram = getattr(method, "gram_teacher", None)
    if cfg.gram.teacher_path:
        gram = None
    if path:
        obj = read_file(path)
        if kind_of(obj) == "dinokit_checkpoint" and distilled_student_prefix(obj) is None:
            _load_method_parts(method, obj, str(path), gram)
        else:
            state = backbone_state_dict(obj, "teacher")
            mapped = check_backbone_weights(method.student_backbone, state, source=str(path),
                                            adapt_channels=True)
            targets = [method.student_backbone, method.teacher_backbone]
            targets += [gram] if gram is not None else []
            for bb in targets:
                bb.load_state_dict(mapped, strict=False)
    if cfg.backbone.freeze_patch_embed:
        freeze_patch_embed(method.student_backbone)
    if cfg.backbone.grad_checkpointing:
        method.student_backbone.set_grad_checkpointing(True)


def _load_method_parts(method: nn.Module, obj: Mapping[str, Any], source: str,
                       gram: nn.Module | None) -> None:
    tensors = _tensors(obj)
    parts = {}
    for part in ("student", "teacher"):
        prefix = f"method.{part}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module = getattr(method, part)
        problems = fit_problems(module, state)
        if problems:
            raise WeightsError(f"{source}: its {part} does not fit this method: " + "; ".join(problems))
        parts[part] = state
    for part, state in parts.items():
        getattr(method, part).load_state_dict(state, strict=False)
    if gram is not None:
        gram.load_state_dict(method.teacher_backbone.state_dict())


def freeze_patch_embed(backbone: nn.Module) -> None:
    """Stop training the patch embedding (a common choice when continuing on a new domain)."""
    model = getattr(backbone, "model", backbone)
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        raise WeightsError(
            f"backbone.freeze_patch_embed: {type(model).__name__} has no patch embedding (ViTs only)"
        )
    for p in pe.parameters():
        p.requires_grad_(False)
