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

from dinokit.settings import (
    STAGE_CROPS,
    STRATEGY_FAMILIES,
    TERM_SECTIONS,
    BackboneSettings,
    CropSettings,
    DataSettings,
    DinoSettings,
    DistillationSettings,
    GramSettings,
    HeadSettings,
    IBOTSettings,
    KoLeoSettings,
    ModelSettings,
    OptimSettings,
    StageSettings,
    TeacherSettings,
    TrainerSettings,
)


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that names the same key twice (PyYAML would silently keep the last)."""

    def __init__(self, key: Any, first_line: int, line: int):
        self.key, self.first_line, self.line = key, first_line, line
        super().__init__(f"{key!r} appears twice in the same mapping (lines {first_line} and {line}); "
                         "only one may be given")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key named twice in one mapping. Keys merged in with ``<<``
    may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise DuplicateKeyError(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKeyError` for a key named twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: plain data only


@dataclass
class Config:
    """A dinokit run: one settings object per concern (see :mod:`dinokit.settings`)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    heads: HeadSettings = field(default_factory=HeadSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    dino: DinoSettings = field(default_factory=DinoSettings)
    ibot: IBOTSettings = field(default_factory=IBOTSettings)
    koleo: KoLeoSettings = field(default_factory=KoLeoSettings)
    gram: GramSettings = field(default_factory=GramSettings)
    distillation: DistillationSettings = field(default_factory=DistillationSettings)
    crops: CropSettings = field(default_factory=CropSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    stages: list[StageSettings] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe: tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> Config:
        """Check cross-field rules; returns self."""
        d, c = self.data, self.crops
        if d.dataset in ("folder", "shards", "multiband") and not d.path:
            raise ConfigError(f"data.path: required when data.dataset is '{d.dataset}'")
        if d.dataset == "shards" and d.augment_on == "device":
            raise ConfigError("data.augment_on: 'device' reads an image folder or a demo set; with "
                              "data.dataset=shards the multi-crop runs in the loader workers")
        if d.channels not in (1, 3) or d.dataset == "multiband":
            in_chans = (self.backbone.kwargs or {}).get("in_chans", 3)
            if d.dataset != "multiband":
                raise ConfigError(f"data.channels: {d.channels} channels need data.dataset=multiband (images "
                                  "have 1 or 3)")
            if in_chans != d.channels:
                raise ConfigError(f"backbone.kwargs.in_chans: {in_chans} but data.channels is "
                                  f"{d.channels}; set backbone.kwargs.in_chans={d.channels}")
            if d.augment_on == "device":
                raise ConfigError("data.augment_on: 'device' crops uint8 images; multi-band data is "
                                  "cropped in the loader workers (data.augment_on=workers)")
        # one view per image is enough where the student matches the teacher's features of that
        # same view (feature distillation); every other objective compares two different crops
        one_view = self.model.method == "distill" and self.distillation.objective == "features"
        if c.n_global + c.n_local < 2 and not one_view:
            raise ConfigError(
                "crops.n_local: the DINO loss needs at least two crops per image "
                f"(n_global={c.n_global}, n_local={c.n_local}; one is enough only with "
                "model.method=distill and distillation.objective=features)"
            )
        if self.trainer.max_steps == 0:
            raise ConfigError("trainer.max_steps: must be -1 (epochs decide) or >= 1, got 0")
        spec = _method_spec(self.model.method)
        t = self.teacher
        if t.momentum is not None and t.final_momentum < t.momentum:
            raise ConfigError(f"teacher.final_momentum ({t.final_momentum}) must be >= teacher.momentum "
                              f"({t.momentum})")
        if self.gram.weight > 0 and "gram" not in spec.sections:
            raise ConfigError(f"gram.weight: method {self.model.method!r} has no Gram anchoring term (its "
                              f"terms: {', '.join(spec.sections)}; dinov3 has one)")
        _check_stages(self.stages, spec.sections)
        if self.model.students and self.model.method != "distill":
            raise ConfigError(f"model.students: only method=distill trains several students (method is "
                              f"{self.model.method!r})")
        self.model.students = check_students(self.model.students)
        if any(s.crops for s in self.stages) and (d.dataset == "shards" or d.augment_on == "device"):
            raise ConfigError("stages: a stage with its own crops needs them made in the loader workers from "
                              "an indexed dataset (data.augment_on=workers, not data.dataset=shards)")
        return self


def _method_spec(name: str) -> Any:
    from dinokit.methods.registry import METHODS  # the registry imports the methods, which read settings

    if name not in METHODS:
        raise ConfigError(f"model.method: must be one of {sorted(METHODS)}, got {name!r}"
                          f"{_suggest(str(name), sorted(METHODS))}")
    return METHODS[name]


def _length_left_out(s: StageSettings) -> bool:
    return all(getattr(s, k, None) is None for k in ("steps", "epochs", "fraction"))


def _may_move(stages: list[StageSettings], i: int) -> bool:
    """Whether stage ``i``'s start moves when an earlier stage ends early or is skipped: the stage
    without a length takes up the difference, so only the stages between it and a movable stage move."""
    for p in reversed(stages[:i]):
        if _length_left_out(p):
            return False
        if p.until_teacher_entropy is not None or p.skip_with_init_heads:
            return True
    return False


def _check_stages(stages: list[StageSettings], sections: tuple[str, ...]) -> None:
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages: stage names must be unique, got {names}")
    for i, s in enumerate(stages):
        key = f"stages[{i}]"
        lengths = [k for k in ("steps", "epochs", "fraction") if getattr(s, k, None) is not None]
        if len(lengths) > 1:
            raise ConfigError(f"{key}: give steps, epochs or fraction, not {' and '.join(lengths)}")
        open_before = [p.name for p in stages[:i] if _length_left_out(p)]
        if not lengths and open_before:
            raise ConfigError(f"{key}: only one stage may leave out its length (steps, epochs or fraction): "
                              f"stage {open_before[0]!r} does already")
        movable = s.until_teacher_entropy is not None or s.skip_with_init_heads
        if movable and i == len(stages) - 1:
            knob = "until_teacher_entropy" if s.until_teacher_entropy is not None else "skip_with_init_heads"
            raise ConfigError(f"{key}.{knob}: the last stage runs to the end of the run; only a stage "
                              "followed by another may end early or be skipped")
        if s.crops and _may_move(stages, i):
            raise ConfigError(f"{key}.crops: a stage with its own crops cannot start where an earlier stage "
                              "that may end early or be skipped would move it (the loader places the crops "
                              "by planned step): put a stage without a length between them")
        for part in s.frozen:
            if not isinstance(part, str) or not part:
                raise ConfigError(f"{key}.frozen: expected part names, got {part!r}")
        for term, w in s.weights.items():
            if term not in TERM_SECTIONS:
                raise ConfigError(f"{key}.weights: unknown loss term {term!r}; terms are "
                                  f"{list(TERM_SECTIONS)}"
                                  f"{_suggest(str(term), list(TERM_SECTIONS))}")
            if term not in sections:
                raise ConfigError(f"{key}.weights.{term}: the method has no {term} term (its terms: "
                                  f"{', '.join(sections)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"{key}.weights.{term}: expected a number >= 0, got {w!r}")


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "backbone": BackboneSettings,
    "heads": HeadSettings,
    "teacher": TeacherSettings,
    "dino": DinoSettings,
    "ibot": IBOTSettings,
    "koleo": KoLeoSettings,
    "gram": GramSettings,
    "distillation": DistillationSettings,
    "crops": CropSettings,
    "data": DataSettings,
    "optim": OptimSettings,
    "trainer": TrainerSettings,
}

#: Keys of the flat ``model`` section (and the crop and mask keys of ``data``) before the config
#: was grouped by concern: a config that still names one is refused with its new key.
MOVED_KEYS: dict[str, str] = {
    "model.backbone": "backbone.name", "model.backbone_kwargs": "backbone.kwargs",
    "model.pretrained": "backbone.pretrained", "model.n_registers": "backbone.n_registers",
    "model.drop_path_rate": "backbone.drop_path_rate", "model.drop_path_mode": "backbone.drop_path_mode",
    "model.drop_path_uniform": "backbone.drop_path_uniform",
    "model.freeze_patch_embed": "backbone.freeze_patch_embed",
    "model.grad_checkpointing": "backbone.grad_checkpointing",
    "model.packed_crops": "backbone.packed_crops", "model.channels_last": "backbone.channels_last",
    "model.head_hidden_dim": "heads.hidden_dim", "model.head_bottleneck_dim": "heads.bottleneck_dim",
    "model.head_layers": "heads.layers", "model.head_batch_norm": "heads.batch_norm",
    "model.norm_last_layer": "heads.norm_last_layer", "model.head_weight_norm": "heads.weight_norm",
    "model.temperature_teacher": "teacher.temperature",
    "model.temperature_teacher_warmup": "teacher.warmup_temperature",
    "model.warmup_epochs_temperature_teacher": "teacher.warmup_epochs",
    "model.temperature_warmup_unit": "teacher.warmup_unit", "model.ema_decay_start": "teacher.momentum",
    "model.ema_decay_end": "teacher.final_momentum", "model.centering": "teacher.centering",
    "model.center_momentum": "teacher.center_momentum",
    "model.sinkhorn_iterations": "teacher.sinkhorn_iterations",
    "model.n_prototypes": "dino.n_prototypes",
    "model.temperature_student": "dino.student_temperature (and ibot.student_temperature)",
    "model.patch_loss_weight": "ibot.weight", "model.n_patch_prototypes": "ibot.n_prototypes",
    "model.shared_head": "ibot.shared_head", "data.mask_probability": "ibot.mask_probability",
    "data.mask_ratio_range": "ibot.mask_ratio_range", "data.mask_mode": "ibot.mask_mode",
    "data.mask_sampling": "ibot.mask_sampling", "model.koleo_weight": "koleo.weight",
    "model.koleo_all_processes": "koleo.all_processes",
    **{f"model.gram_{k}": f"gram.{k}" for k in (
        "weight", "start_step", "ramp_steps", "refresh_every", "first_refresh_step", "max_refreshes",
        "ema_teacher", "img_level", "remove_neg", "remove_only_teacher_neg", "teacher_size",
        "teacher_path")},
    "data.crop_preset": "crops.preset", "data.source_size": "crops.source_size",
    **{f"data.{k}": f"crops.{k}" for k in ("global_size", "local_size", "n_global", "n_local",
                                           "global_scale", "local_scale")},
}


#: Keys of one entry of ``model.students``.
STUDENT_KEYS = ("name", "backbone", "lr_mult")


def check_students(value: Any) -> list[dict[str, Any]]:
    """``model.students``, checked and normalised: a list of ``{name, backbone, lr_mult}`` with
    unique identifier names, ``backbone`` a mapping of backbone-section keys (coerced), ``lr_mult``
    a number > 0 (default 1). Errors name ``model.students[i].key``."""
    if not isinstance(value, list):
        raise ConfigError(f"model.students: expected a list of students, got {value!r}")
    fields, hints = _field_map(BackboneSettings), typing.get_type_hints(BackboneSettings)
    out, names = [], set()
    for i, item in enumerate(value):
        key = f"model.students[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{key}: expected a mapping (name, backbone, lr_mult), got {item!r}")
        for k in item:
            if k not in STUDENT_KEYS:
                raise ConfigError(f"{key}: unknown key {k!r}{_suggest(str(k), list(STUDENT_KEYS))}")
        name = item.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{key}.name: expected a name of letters, digits and _, got {name!r}")
        if name in names:
            raise ConfigError(f"{key}.name: {name!r} names two students")
        names.add(name)
        backbone = item.get("backbone") or {}
        if not isinstance(backbone, dict):
            raise ConfigError(f"{key}.backbone: expected a mapping of backbone keys, got {backbone!r}")
        checked = {}
        for k, v in backbone.items():
            if k not in fields:
                raise ConfigError(f"{key}.backbone: unknown key {k!r}{_suggest(str(k), list(fields))}")
            checked[k] = _coerce(f"{key}.backbone.{k}", v, hints[k], dict(fields[k].metadata))
        mult = item.get("lr_mult", 1.0)
        number = isinstance(mult, (int, float)) and not isinstance(mult, bool)
        if not number or not math.isfinite(mult) or mult <= 0:
            raise ConfigError(f"{key}.lr_mult: expected a number > 0, got {mult!r}")
        out.append({"name": name, "backbone": checked, "lr_mult": float(mult)})
    return out


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
    if isinstance(value, str) and get_origin(tp) is Literal and value in get_args(tp):
        return value  # a choice spelled like YAML's null ("none") is the choice, not an empty value
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
    cfg = base if base is not None else Config()
    cfg = Config(**{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS},
                 stages=[dataclasses.replace(st) for st in cfg.stages])
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got a {type(data).__name__}")
    for section, values in (data or {}).items():
        if not isinstance(section, str):
            raise ConfigError(f"config: section names must be text, got {section!r}")
        if section == "stages":
            set_value(cfg, "stages", values)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}"
                              f"{_suggest(section, [*SECTIONS, 'stages'])}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        for k, v in values.items():
            set_value(cfg, f"{section}.{k}", v)
    return cfg.validate()


def _unknown_key(key: str) -> ConfigError:
    if key in MOVED_KEYS:
        return ConfigError(f"config key {key!r} is now {MOVED_KEYS[key]} (the config is grouped by "
                           "concern: model, backbone, heads, teacher, dino, ibot, koleo, gram, crops, data, "
                           "optim, trainer, stages)")
    close = difflib.get_close_matches(key, [*all_keys(), *MOVED_KEYS], n=1, cutoff=0.5)
    hint = f"; did you mean {MOVED_KEYS.get(close[0], close[0]).split(' ')[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved by a run (its ``config.yaml`` or checkpoint) in the flat layout, moved to
    the sections by concern (:data:`MOVED_KEYS`); a config already in them is returned as is.
    Configs that people write are not upgraded: their old keys are refused with the new names."""
    if not isinstance(data, dict) or not any(f"{s}.{k}" in MOVED_KEYS for s in ("model", "data")
                                             for k in (data.get(s) or {})):
        return data
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section in ("model", "data"):
        for key in [k for k in out.get(section, {}) if f"{section}.{k}" in MOVED_KEYS]:
            value = out[section].pop(key)
            new_section, new_key = MOVED_KEYS[f"{section}.{key}"].split(" ")[0].split(".")
            out.setdefault(new_section, {})[new_key] = value
            if key == "temperature_student":
                out.setdefault("ibot", {})["student_temperature"] = value
    return out


def parse_stages(value: Any) -> list[StageSettings]:
    """``stages``: a list of mappings (see :class:`~dinokit.settings.StageSettings`); errors name
    ``stages[i].key``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"stages: expected a list of stages, got {value!r}")
    fmap = _field_map(StageSettings)
    hints = typing.get_type_hints(StageSettings)
    stages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping (name, steps or epochs, frozen, lr_mult, "
                              f"warmup_epochs, weights), got {item!r}")
        stage = StageSettings(name=f"stage{i}")
        for k, v in item.items():
            if k not in fmap:
                raise ConfigError(f"stages[{i}]: unknown key {k!r}{_suggest(str(k), list(fmap))}")
            tp = hints[k]
            if k == "frozen":
                if isinstance(v, str):
                    v = [v]
                if not isinstance(v, list):
                    raise ConfigError(f"stages[{i}].frozen: expected a list of part names, got {v!r}")
                setattr(stage, k, [str(x) for x in v])
            elif k == "weights":
                if not isinstance(v, dict):
                    raise ConfigError(f"stages[{i}].weights: expected a mapping term -> weight, got {v!r}")
                setattr(stage, k, dict(v))
            elif k == "crops":
                setattr(stage, k, _stage_crops(f"stages[{i}].crops", v))
            else:
                setattr(stage, k, _coerce(f"stages[{i}].{k}", v, tp, dict(fmap[k].metadata)))
        stages.append(stage)
    return stages


def _stage_crops(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of crop settings, got {value!r}")
    fields, hints = _field_map(CropSettings), typing.get_type_hints(CropSettings)
    out = {}
    for name, v in value.items():
        if name not in STAGE_CROPS:
            raise ConfigError(f"{key}: {name!r} is not a crop setting a stage may change; use "
                              f"{list(STAGE_CROPS)}{_suggest(str(name), list(STAGE_CROPS))}")
        out[name] = _coerce(f"{key}.{name}", v, hints[name], dict(fields[name].metadata))
    return out


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key with type coercion and range checks (``stages`` takes the whole list)."""
    if key == "stages":
        cfg.stages = parse_stages(value)
        return
    if "." not in key:
        raise ConfigError(f"config key {key!r} must be section.name{_suggest(key, all_keys())}")
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise _unknown_key(key)
    fmap = _field_map(SECTIONS[section])
    if name not in fmap:
        raise _unknown_key(key)
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
            value = load_yaml(raw) if raw != "" else None
        except DuplicateKeyError as e:
            raise ConfigError(f"{key.strip()}: the key {e.key!r} appears twice in {raw!r}") from None
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
        data = load_yaml(text)
    except DuplicateKeyError as e:
        raise ConfigError(f"{name}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: invalid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid YAML: nested too deeply") from None
    if data is None:
        raise ConfigError(f"{name}: the config file holds no settings")
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: top level must be a mapping of sections (model:, backbone:, data:, "
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
    lines.append(f"stages:  {StageSettings.__doc__.splitlines()[0]} A list; each stage takes:")
    hints = typing.get_type_hints(StageSettings)
    for f in dataclasses.fields(StageSettings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name}={default!r}  {f.metadata['help']}")
    return "\n".join(lines)
