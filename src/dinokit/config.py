"""One typed config tree for YAML presets, ``key=value`` overrides, ``--help`` and the Python API.

Every option is a dataclass field with a default and a ``help`` string, so the defaults, the CLI
help text and the validation all come from this file. Unknown keys, wrong types and out-of-range
values fail before any work starts, with the dotted key named (and the closest valid key for a
typo).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


#: Lightning accelerator names accepted by ``trainer.accelerator``.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
#: Lightning precision names accepted by ``trainer.precision``.
PRECISIONS = ("auto", "64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed",
              "bf16-true")
#: Families of Lightning strategy names accepted by ``trainer.strategy`` (``ddp``,
#: ``ddp_find_unused_parameters_true``, ``fsdp_cpu_offload``, ``deepspeed_stage_2``, ...).
STRATEGY_FAMILIES = ("auto", "ddp", "fsdp", "deepspeed", "single_device", "xla", "single_xla", "dp")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """The method and its network."""

    method: str = _f("dino", "DINO-family method: dino, ibot, dinov2, dinov3 (the method registry)",
                     method=True)
    backbone: str = _f(
        "vit_small_patch16_224",
        "timm model name, or torchvision/<name>; ViTs get dynamic_img_size=True",
    )
    backbone_kwargs: dict = _f({}, "extra timm.create_model arguments (img_size, patch_size, ...)")
    pretrained: bool = _f(False, "start from the published weights of the named backbone")
    init_weights: str | None = _f(
        None, "weights to start from (.safetensors/.pth: timm, Meta DINOv2/DINOv3, dinokit export or run "
        "checkpoint); loaded into student, teacher and Gram teacher"
    )
    freeze_patch_embed: bool = _f(False, "keep the patch embedding fixed (continued pretraining)")
    grad_checkpointing: bool = _f(False, "recompute student block activations in backward (less memory)")
    packed_crops: Literal["auto", "true", "false"] = _f(
        "auto", "all student crops through the ViT blocks in one sequence-packed pass, attention kept "
        "within each crop (auto: where it measured faster, see BENCHMARKS.md)")
    channels_last: bool = _f(
        True, "CNN weights and inputs in channels-last memory format (faster convolutions on GPUs and "
        "on CPUs: BENCHMARKS.md)")
    n_prototypes: int = _f(65536, "prototypes K of the CLS head", min=2, max=1 << 20)
    head_hidden_dim: int = _f(2048, "hidden width of the head MLP", min=1, max=1 << 16)
    head_bottleneck_dim: int = _f(256, "bottleneck width before the prototypes", min=1, max=1 << 14)
    head_layers: int = _f(3, "layers of the head MLP", min=1, max=16)
    head_batch_norm: bool = _f(False, "BatchNorm in the head MLP (for CNN backbones)")
    norm_last_layer: bool | None = _f(
        None, "fix the prototype weight-norm gain at 1 (None = the method's official default: DINO/iBOT yes, "
        "DINOv2 no)")
    head_weight_norm: bool | None = _f(
        None, "[dinov2/3] weight-normalised prototypes (None = official: DINOv2 yes, DINOv3 no)")
    temperature_student: float = _f(0.1, "student temperature tau_s", gt=0)
    temperature_teacher_warmup: float = _f(0.04, "teacher temperature at epoch 0", gt=0)
    temperature_teacher: float = _f(0.07, "teacher temperature after warm-up", gt=0)
    warmup_epochs_temperature_teacher: int = _f(30, "epochs of teacher temperature warm-up", min=0)
    center_momentum: float = _f(0.9, "EMA momentum of the teacher centre", ge=0, le=1)
    ema_decay_start: float | None = _f(
        None, "teacher EMA momentum at step 0 (None = official: DINO/iBOT 0.996, DINOv2/v3 0.992)",
        ge=0, le=1)
    ema_decay_end: float = _f(1.0, "teacher EMA momentum at the last step", ge=0, le=1)
    drop_path_rate: float = _f(0.0, "stochastic depth of the student ViT", ge=0, le=1)
    drop_path_mode: Literal["auto", "sample", "subset"] = _f(
        "auto", "stochastic depth form in plain ViT blocks: sample = timm DropPath (every sample through the "
        "branch, times a 0/1 mask); subset = DINOv2/v3's (the branch on the kept samples only, added back "
        "scaled by b/k: less compute); auto = official: DINOv3 subset, DINOv2 subset for rates > 0.1, "
        "DINO/iBOT sample")
    drop_path_uniform: bool | None = _f(
        None, "every student block gets drop_path_rate (else linspace(0, rate, depth)); None = official: "
        "DINOv2/v3 yes, DINO/iBOT no")
    # DINOv2 / DINOv3
    n_patch_prototypes: int = _f(65536, "[dinov2/3] prototypes of the iBOT patch head", min=2, max=1 << 20)
    shared_head: bool = _f(False, "[dinov2/3] share one head for CLS and patch tokens")
    centering: Literal["sinkhorn", "ema"] = _f("sinkhorn", "[dinov2/3] teacher centring")
    sinkhorn_iterations: int = _f(3, "[dinov2/3] Sinkhorn-Knopp iterations", min=1, max=1000)
    patch_loss_weight: float = _f(1.0, "[dinov2/3] weight of the iBOT patch loss", ge=0)
    koleo_weight: float = _f(0.1, "[dinov2/3] weight of the KoLeo regulariser", ge=0)
    n_registers: int | None = _f(None, "[dinov2/3] register tokens (None = official: DINOv2 0, DINOv3 4)",
                                 min=0, max=64)
    koleo_all_processes: bool = _f(False, "[dinov2/3] KoLeo neighbours over the global batch, gradient "
                                   "through the gather (DINOv3's koleo_loss_distributed); off = official "
                                   "default: per process")
    temperature_warmup_unit: Literal["epoch", "step"] | None = _f(
        None, "teacher temperature warm-up per epoch or per step (None = official: DINO epoch, "
        "DINOv2/v3 step)")
    gram_weight: float = _f(0.0, "[dinov3] weight of Gram anchoring (0 = off)", ge=0)
    gram_start_step: int = _f(0, "[dinov3] step at which Gram anchoring starts", min=0)
    gram_ramp_steps: int = _f(0, "[dinov3] steps over which its weight ramps up", min=0)
    gram_refresh_every: int | None = _f(None, "[dinov3] refresh the Gram teacher every N steps", min=1)
    gram_teacher_path: str | None = _f(None, "[dinov3] Gram teacher backbone weights file")
    gram_first_refresh_step: int = _f(0, "[dinov3] no Gram teacher refresh before this step", min=0)
    gram_max_refreshes: int | None = _f(None, "[dinov3] at most this many refreshes", min=0)
    gram_ema_teacher: bool = _f(False, "[dinov3] use the EMA teacher itself as Gram teacher")
    gram_img_level: bool = _f(False, "[dinov3] Gram matrices per image (else over the local batch)")
    gram_remove_neg: bool = _f(False, "[dinov3] clamp negative similarities before the loss")
    gram_remove_only_teacher_neg: bool = _f(False, "[dinov3] clamp only the teacher's negatives")
    gram_teacher_size: int | None = _f(None, "[dinov3] Gram teacher input size (crops resized)", min=4)


@dataclass
class DataConfig:
    """Where the images come from and how they are cropped."""

    dataset: Literal["folder", "shards", "fashion-mnist", "digits", "demo"] = _f(
        "folder", "folder = your images under data.path; shards = WebDataset tar shards under "
        "data.path (dinokit data shard); demo = Fashion-MNIST, else digits"
    )
    path: str | None = _f(None, "image folder (recursive; class sub-folders give labels), or for "
                          "shards: their folder, index.json or brace pattern")
    iterations_per_epoch: int | None = _f(None, "shards: batches per process per epoch (default: "
                                          "one pass over index.json's samples)", min=1)
    shuffle_buffer: int = _f(1000, "shards: sample shuffle buffer size (0 = read order)", min=0,
                             max=1 << 24)
    val_path: str | None = _f(None, "labelled folder for validation loss and k-NN monitor")
    limit: int | None = _f(None, "use only the first N training images", min=1)
    val_limit: int | None = _f(None, "use only the first N validation images", min=1)
    batch_size: int = _f(64, "images per process per step", min=1, max=1 << 16)
    num_workers: int = _f(4, "DataLoader worker processes", min=0, max=256)
    strict_images: bool = _f(False, "fail on the first unreadable image instead of skipping it")
    crop_preset: Literal["imagenet", "small"] = _f("imagenet", "augmentation defaults")
    source_size: int = _f(28, "for crop_preset=small: size of the source images", min=4, max=1 << 14)
    global_size: int | None = _f(None, "global crop size (preset default if unset)", min=4, max=1 << 13)
    local_size: int | None = _f(None, "local crop size (preset default if unset)", min=4, max=1 << 13)
    n_global: int = _f(2, "global crops per image", min=1, max=16)
    n_local: int = _f(8, "local crops per image", min=0, max=64)
    global_scale: tuple = _f((0.4, 1.0), "RandomResizedCrop scale of global crops", scale=True)
    local_scale: tuple = _f((0.05, 0.4), "RandomResizedCrop scale of local crops", scale=True)
    channels: int = _f(3, "channels fed to the network (1 or 3)", min=1, max=3)
    mean: tuple | None = _f(None, "per-channel normalisation mean (1 or `channels` values; preset if unset)")
    std: tuple | None = _f(None, "per-channel normalisation std (1 or `channels` values; preset if unset)")
    augment_on: Literal["workers", "device"] = _f(
        "workers", "workers = per-sample crops in the loader; device = batched crops of uint8 images on "
        "the training device (GPU when there is one)"
    )
    mask_probability: float = _f(0.5, "[dinov2/3] fraction of global crops masked", ge=0, le=1)
    mask_ratio_range: tuple = _f((0.1, 0.5), "[dinov2/3] masked patch ratio range", ratio=True)
    mask_mode: Literal["block", "random"] = _f("block", "[dinov2/3] block (iBOT) or random masks")
    mask_sampling: Literal["batch", "sample"] = _f(
        "batch", "[dinov2/3] batch = official (masked crops and ratios spread over each batch); sample = "
        "each image's masks from (seed, epoch, index), the same at any batch size or world size")


@dataclass
class OptimConfig:
    """Optimiser and schedules (per iteration, with the linear scaling rule)."""

    optimizer: Literal["adamw", "sgd", "lars"] = _f("adamw", "optimiser")
    lr: float = _f(0.0005, "base learning rate for a global batch of lr_reference_batch", gt=0)
    lr_scaling: Literal["linear", "sqrt", "none"] = _f("linear", "lr scaling rule with batch size")
    lr_reference_batch: int = _f(256, "reference batch of the scaling rule", min=1, max=1 << 24)
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine", ge=0)
    warmup_epochs: float = _f(10, "epochs of linear lr warm-up", ge=0)
    weight_decay: float = _f(0.04, "weight decay at step 0", ge=0)
    weight_decay_end: float = _f(0.4, "weight decay at the last step (cosine)", ge=0)
    momentum: float = _f(0.9, "SGD/LARS momentum", ge=0, le=1)
    betas: tuple = _f((0.9, 0.999), "AdamW betas", betas=True)
    clip_grad: float = _f(3.0, "gradient clipping norm (0 = off)", ge=0)
    clip_mode: Literal["auto", "per_param", "per_module", "global", "none"] = _f(
        "auto", "auto = the method's official rule (DINO/iBOT: per_param, DINOv2/v3: per_module); "
        "per_param = DINO's per-tensor norm; per_module = backbone and each head by their own norm"
    )
    no_decay_rule: Literal["auto", "dino", "dinov2", "dinov3", "dinokit"] = _f(
        "auto", "which parameters get no weight decay (auto = the method's official rule; dinokit = "
        "also tokens and positional embeddings)"
    )
    freeze_last_layer_mode: Literal["auto", "cancel_grad", "zero_lr"] = _f(
        "auto", "how prototypes are frozen (auto: DINO/iBOT cancel gradients, DINOv2/v3 LR 0)"
    )
    freeze_last_layer_epochs: int = _f(1, "epochs during which the prototypes stay frozen", min=0)
    layer_decay: float = _f(1.0, "layer-wise lr decay for ViTs (DINOv2: 0.9; 1 = off)", gt=0, le=1)
    patch_embed_lr_mult: float = _f(1.0, "lr multiplier of the patch embedding (DINOv2: 0.2)", gt=0)


@dataclass
class TrainerConfig:
    """The Lightning Trainer and the run directory."""

    epochs: int = _f(100, "training epochs", min=1, max=1_000_000)
    max_steps: int = _f(-1, "stop after this many optimiser steps (-1 = epochs decide)", min=-1,
                        max=1 << 40)
    accelerator: str = _f("auto", "auto, cpu, gpu, cuda, mps or tpu", choices=ACCELERATORS)
    devices: str = _f("auto", "auto, a device count, -1 (all) or a list of indices", devices=True)
    num_nodes: int = _f(1, "nodes (torchrun / SLURM)", min=1, max=100_000)
    strategy: str = _f("auto", "auto, ddp, ddp_spawn, fsdp, deepspeed, ... (Lightning names)",
                       strategy=True)
    precision: str = _f("auto", "auto (bf16-mixed on a GPU with bf16, else 32), 32, bf16-mixed or "
                        "16-mixed (loss scaling), ...", choices=PRECISIONS)
    accumulate_grad_batches: int = _f(1, "gradient accumulation steps", min=1, max=1 << 14)
    seed: int = _f(0, "random seed (data order, augmentations, init)", min=0, max=2**32 - 1)
    output_dir: str = _f("runs", "parent folder of run directories")
    run_name: str | None = _f(None, "run directory name (default: timestamp + method)")
    resume: str | None = _f(
        None, "auto (newest good checkpoint of trainer.run_name, else start fresh), last, or a "
        "checkpoint path: continue that run exactly"
    )
    log_every_n_steps: int = _f(10, "logging interval in steps", min=1)
    checkpoint_every_n_steps: int | None = _f(None, "also checkpoint every N steps", min=1)
    keep_checkpoints: int = _f(
        1, "step checkpoints (checkpoint_every_n_steps) to keep, the newest; -1 = all, 0 = none "
        "(last.ckpt is kept whatever the value)", min=-1, max=1 << 40)
    knn_every_n_epochs: int = _f(0, "k-NN monitor interval on data.val_path (0 = off)", min=0)
    progress: bool = _f(True, "show a progress bar")
    compile: bool = _f(False, "torch.compile the method forward (student, teacher, heads, loss terms)")
    sync_batchnorm: bool = _f(
        True, "SyncBatchNorm in student and teacher with several GPU processes (BatchNorm models)"
    )
    stop_on_collapse: bool = _f(False, "exit non-zero when the collapse guard fires (else warn)")
    max_nonfinite_steps: int = _f(
        3, "stop after this many consecutive non-finite steps (each one is skipped on the device)", min=1)
    collapse_window: int = _f(500, "steps a teacher collapse must last before it is reported",
                              min=1, max=1 << 40)
    slurm_requeue: bool = _f(False, "on SIGUSR1/SIGTERM under SLURM: checkpoint, then scontrol requeue")


@dataclass
class Config:
    """A dinokit run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe: tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> Config:
        """Check cross-field rules; returns self."""
        d, m = self.data, self.model
        if d.dataset in ("folder", "shards") and not d.path:
            raise ConfigError(f"data.path: required when data.dataset is '{d.dataset}'")
        if d.dataset == "shards" and d.augment_on == "device":
            raise ConfigError("data.augment_on: 'device' reads an image folder or a demo set; with "
                              "data.dataset=shards the multi-crop runs in the loader workers")
        if d.n_global + d.n_local < 2:
            raise ConfigError(
                "data.n_local: the DINO loss needs at least two crops per image "
                f"(n_global={d.n_global}, n_local={d.n_local})"
            )
        if self.trainer.max_steps == 0:
            raise ConfigError("trainer.max_steps: must be -1 (epochs decide) or >= 1, got 0")
        from dinokit.methods.registry import METHODS

        if m.method not in METHODS:
            raise ConfigError(f"model.method: must be one of {sorted(METHODS)}, got {m.method!r}"
                              f"{_suggest(str(m.method), sorted(METHODS))}")
        if m.ema_decay_start is not None and m.ema_decay_end < m.ema_decay_start:
            raise ConfigError(
                f"model.ema_decay_end ({m.ema_decay_end}) must be >= model.ema_decay_start "
                f"({m.ema_decay_start})"
            )
        return self


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
}


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in get_args(tp)
    return tp, False


def _coerce(key: str, value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """Convert ``value`` to the field type ``tp`` and check its range; errors name ``key``."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: may not be empty")
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML true/false for "true"/"false"
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                value = value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise TypeError
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value}")
        elif tp is str:
            if meta.get("devices") and isinstance(value, (list, tuple)):
                value = _device_list(key, value)
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise TypeError
            value = str(value)
            if "\x00" in value:
                raise ConfigError(f"{key}: may not contain NUL characters")
        elif tp is tuple:
            if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) for v in value):
                raise TypeError
            value = tuple(float(v) for v in value)
            if not all(math.isfinite(v) for v in value):
                raise ConfigError(f"{key}: must hold finite numbers, got {list(value)}")
        elif tp is dict and not isinstance(value, dict):
            raise TypeError
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    _check_range(key, value, meta)
    return value


def _device_list(key: str, value: list | tuple) -> str:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ConfigError(f"{key}: a device list must hold indices >= 0, got {list(value)}")
    return ",".join(str(v) for v in value)


def _check_choice(key: str, v: str, meta: dict[str, Any]) -> None:
    if "choices" in meta and v not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {list(meta['choices'])}, got {v!r}"
                          f"{_suggest(v, list(meta['choices']))}")
    if meta.get("strategy"):
        family = v.split("_")[0] if not v.startswith("single_") else "_".join(v.split("_")[:2])
        if v != "auto" and family not in STRATEGY_FAMILIES:
            raise ConfigError(f"{key}: {v!r} is not a Lightning strategy; use one of "
                              f"{list(STRATEGY_FAMILIES)} (or a variant such as ddp_spawn)")
    if meta.get("devices"):
        ok = v == "auto" or v == "-1" or all(p.strip().isdigit() for p in v.split(",") if p.strip())
        if not ok or not v.strip() or (v.isdigit() and not 0 < int(v) <= 1 << 16):
            raise ConfigError(f"{key}: must be auto, a count >= 1, -1 (all) or a list of device "
                              f"indices, got {v!r}")


def _check_range(key: str, v: Any, meta: dict[str, Any]) -> None:
    if isinstance(v, str):
        _check_choice(key, v, meta)
        return
    if isinstance(v, int) and "max" not in meta and abs(v) > 1 << 40:
        raise ConfigError(f"{key}: {v} is out of range (at most {1 << 40})")
    if "min" in meta and v < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {v}")
    if "max" in meta and v > meta["max"]:
        raise ConfigError(f"{key}: must be <= {meta['max']}, got {v}")
    if "gt" in meta and not v > meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}, got {v}")
    if "ge" in meta and v < meta["ge"]:
        raise ConfigError(f"{key}: must be >= {meta['ge']}, got {v}")
    if "le" in meta and v > meta["le"]:
        raise ConfigError(f"{key}: must be <= {meta['le']}, got {v}")
    if meta.get("betas") and (len(v) != 2 or not all(0 <= b < 1 for b in v)):
        raise ConfigError(f"{key}: must be two numbers in [0, 1), got {list(v)}")
    if meta.get("scale") or meta.get("ratio"):
        lo_ok = (lambda x: x > 0) if meta.get("scale") else (lambda x: x >= 0)
        if len(v) != 2 or not (lo_ok(v[0]) and v[0] <= v[1] <= 1):
            rng = "(0, 1]" if meta.get("scale") else "[0, 1]"
            raise ConfigError(f"{key}: must be two ordered numbers in {rng}, got {list(v)}")


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def all_keys() -> list[str]:
    """Every dotted key, e.g. ``optim.lr``."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _field_map(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def from_dict(data: dict[str, Any] | None, base: Config | None = None) -> Config:
    """Build a validated :class:`Config` from a nested dict, on top of ``base`` (or defaults)."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    cfg = Config(**{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got a {type(data).__name__}")
    for section, values in (data or {}).items():
        if not isinstance(section, str):
            raise ConfigError(f"config: section names must be text, got {section!r}")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}{_suggest(section, list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        for k, v in values.items():
            set_value(cfg, f"{section}.{k}", v)
    return cfg.validate()


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key with type coercion and range checks."""
    if "." not in key:
        raise ConfigError(f"config key {key!r} must be section.name{_suggest(key, all_keys())}")
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"unknown config key {key!r}{_suggest(key, all_keys())}")
    fmap = _field_map(SECTIONS[section])
    if name not in fmap:
        raise ConfigError(f"unknown config key {key!r}{_suggest(key, all_keys())}")
    f = fmap[name]
    hints = typing.get_type_hints(SECTIONS[section])
    setattr(getattr(cfg, section), name, _coerce(key, value, hints[name], dict(f.metadata)))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings (values parsed as YAML: ``0.1``, ``true``, ``[0.3, 1.0]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.001)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        set_value(cfg, key.strip(), value)
    return cfg.validate()


def preset_names() -> list[str]:
    """Presets shipped in the package (``dinokit/configs/*.yaml``)."""
    files = resources.files("dinokit").joinpath("configs").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset name or a YAML path, then apply ``key=value`` overrides.

    A YAML file may name ``base: <preset or file>`` to start from another config (a relative
    file path is taken from the including file's folder first); a cycle of bases is an error.
    """
    cfg = _load_chain(source, ()) if source is not None else from_dict({})
    return apply_overrides(cfg, list(overrides or []))


def _source_id(source: str | Path) -> str:
    path = Path(source)
    if not path.suffix and str(source) in preset_names() and not path.is_file():
        return f"preset:{source}"
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # pragma: no cover - a symlink loop
        return str(path)


def _load_chain(source: str | Path, seen: tuple[str, ...]) -> Config:
    ident = _source_id(source)
    if ident in seen:
        chain = " -> ".join([*seen, ident])
        raise ConfigError(f"base: the configs name each other in a cycle: {chain}")
    data = read_yaml(source)
    base = None
    if "base" in data:
        ref = data.pop("base")
        if not isinstance(ref, str) or not ref.strip():
            raise ConfigError(f"base: expected a preset name or a YAML file path, got {ref!r}")
        here = Path(source).parent if Path(source).is_file() else None
        if here is not None and not Path(ref).is_absolute() and (here / ref).is_file():
            ref = str(here / ref)
        base = _load_chain(ref, (*seen, ident))
    return from_dict(data, base)


def read_yaml(source: str | Path) -> dict[str, Any]:
    """Read a preset (by name) or a YAML file into a dict; errors name the file."""
    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise ConfigError(f"config: expected a preset name or a YAML file path, got {source!r}")
    path = Path(source)
    if not path.suffix and str(source) in preset_names() and not path.is_file():
        text = resources.files("dinokit").joinpath("configs", f"{source}.yaml").read_text()
        name = f"preset {source!r}"
    elif path.is_file():
        name = str(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{name}: cannot read the config file: {e.strerror or e}") from None
        if not raw.strip():
            raise ConfigError(f"{name}: the config file is empty")
        if b"\x00" in raw:
            raise ConfigError(f"{name}: not a YAML text file (binary content)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{name}: not a YAML text file (not UTF-8)") from None
    else:
        what = "is a directory, not a YAML file" if path.is_dir() else "is neither a file nor a preset"
        raise ConfigError(f"config {str(source)!r} {what}{_suggest(str(source), preset_names())}; "
                          f"presets: {preset_names()}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: invalid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid YAML: nested too deeply") from None
    if data is None:
        raise ConfigError(f"{name}: the config file holds no settings")
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: top level must be a mapping of sections (model:, data:, optim:, "
                          f"trainer:), got a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{name}: section names must be text, got {bad[0]!r}")
    return data


def help_text() -> str:
    """Every option with its type, default and help, for ``dinokit train --help``."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  {cls.__doc__.strip()}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp, _ = _unwrap_optional(hints[f.name])
            tname = (
                "|".join(map(str, get_args(tp))) if get_origin(tp) is Literal else tp.__name__
            )
            lines.append(f"  {section}.{f.name}={default!r}  ({tname})  {f.metadata['help']}")
    return "\n".join(lines)
