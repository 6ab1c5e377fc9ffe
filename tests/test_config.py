"""The typed config: presets load and validate; bad keys and values fail before training."""

from __future__ import annotations

import re

import pytest

from dinokit.cli import main
from dinokit.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    help_text,
    load_config,
    preset_names,
)


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.model.method in ("dino", "dinov2", "dinov3", "distill")


def test_expected_presets_are_shipped():
    assert {"demo", "vit_small_imagenet", "resnet50_imagenet", "my_images", "dinov2_vit_small",
            "dinov3_vit_small"} <= set(preset_names())


def test_vit_small_imagenet_is_the_paper_recipe():
    cfg = load_config("vit_small_imagenet")
    global_batch = cfg.data.batch_size * int(cfg.trainer.devices)
    assert global_batch == 1024
    assert cfg.optim.lr == 0.0005 and cfg.optim.warmup_epochs == 10
    assert cfg.heads.norm_last_layer is False and cfg.crops.n_local == 10
    assert (cfg.teacher.warmup_temperature, cfg.teacher.temperature, cfg.teacher.warmup_epochs) == (0.04, 0.07, 30)
    assert cfg.trainer.epochs == 100


def test_dinov3_preset_inherits_dinov2_and_adds_registers_and_gram():
    v2, v3 = load_config("dinov2_vit_small"), load_config("dinov3_vit_small")
    assert v3.model.method == "dinov3" and v3.backbone.n_registers == 4 and v3.gram.weight > 0
    assert v3.optim.layer_decay == v2.optim.layer_decay == 0.9


def test_overrides_are_typed():
    cfg = apply_overrides(Config(data=Config().data.__class__(path="x")),
                          ["optim.lr=0.002", "crops.n_local=0", "heads.norm_last_layer=false",
                           "crops.local_scale=[0.1, 0.3]"])
    assert cfg.optim.lr == 0.002 and cfg.crops.n_local == 0
    assert cfg.heads.norm_last_layer is False and cfg.crops.local_scale == (0.1, 0.3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("modle.method=dino", "did you mean 'model.method'"),
        ("teacher.temperature=0", "teacher.temperature: must be > 0"),
        ("dino.student_temperature=-1", "dino.student_temperature: must be > 0"),
        ("teacher.momentum=1.5", "teacher.momentum: must be <= 1"),
        ("teacher.center_momentum=-0.1", "teacher.center_momentum: must be >= 0"),
        ("crops.global_scale=[0.4, 1.5]", "crops.global_scale: must be two ordered numbers in (0, 1]"),
        ("crops.local_scale=[0, 0.4]", "crops.local_scale"),
        ("data.batch_size=abc", "data.batch_size: expected int"),
        ("data.batch_size=2.5", "data.batch_size: expected int"),
        ("model.method=byol", "model.method: must be one of"),
        ("trainer.epochs=0", "trainer.epochs: must be >= 1"),
        ("optim.lr", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_config("demo", [override])


def test_bad_yaml_files_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_prototype: 10\n")
    with pytest.raises(ConfigError, match="did you mean 'dino.n_prototypes'"):
        load_config(bad)
    bad.write_text("trainr:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'trainer'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config(tmp_path / "missing.yaml")


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, [])  # dataset=folder without a path
    with pytest.raises(ConfigError, match="at least two crops"):
        load_config("demo", ["crops.n_global=1", "crops.n_local=0"])
    assert load_config("demo", ["crops.n_global=1", "crops.n_local=1"]).crops.n_local == 1


def test_yaml_round_trip(tmp_path):
    cfg = load_config("dinov3_vit_small", ["optim.lr=0.003"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_help_lists_every_option_with_default():
    text = help_text()
    for key in ("dino.n_prototypes=65536", "optim.lr=None", "crops.n_local=8",
                "trainer.precision='auto'", "gram.weight=0.0"):
        assert key in text


def test_cli_print_config_and_errors(capsys):
    assert main(["train", "--config", "demo", "--print-config", "optim.lr=0.123"]) == 0
    assert "lr: 0.123" in capsys.readouterr().out
    assert main(["train", "--config", "demo", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    assert "dino.n_prototypes" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=.inf", "optim.lr: must be a finite number"),
    ("optim.weight_decay=.nan", "optim.weight_decay: must be a finite number"),
    ("optim.clip_grad=.nan", "optim.clip_grad: must be a finite number"),
    ("crops.global_scale=[0.4, .nan]", "crops.global_scale: must hold finite numbers"),
    ("optim.betas=[0.9, 1.5]", "optim.betas: must be two numbers in"),
    ("dino.n_prototypes=1000000000000", "dino.n_prototypes: must be <="),
    ("data.num_workers=100000", "data.num_workers: must be <="),
    ("trainer.log_every_n_steps=10000000000000", "trainer.log_every_n_steps: .* out of range"),
    ("backbone.name=[vit]", "backbone.name: expected str"),
    ("trainer.accelerator=quantum", "trainer.accelerator: must be one of"),
    ("trainer.strategy=warp", "trainer.strategy: 'warp' is not a Lightning strategy"),
    ("trainer.precision=8", "trainer.precision: must be one of"),
    ("trainer.devices=many", "trainer.devices: must be auto"),
    ("trainer.max_steps=0", "trainer.max_steps: must be -1"),
    ("trainer.seed=-1", "trainer.seed: must be >= 0"),
])
def test_nonsense_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("demo", [override])


def test_valid_lightning_names_and_device_lists_are_accepted():
    cfg = load_config("demo", ["trainer.strategy=ddp_find_unused_parameters_true", "trainer.precision=bf16-mixed",
                               "trainer.devices=[0, 1]", "trainer.accelerator=gpu", "trainer.resume=auto"])
    assert cfg.trainer.devices == "0,1" and cfg.trainer.precision == "bf16-mixed"


def test_config_files_that_are_not_configs(tmp_path):
    for text, message in [("", "empty"), ("[1, 2]", "must be a mapping"), ("42", "must be a mapping")]:
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ConfigError, match="binary"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        load_config("dem")


def test_precision_auto_is_bf16_on_a_bf16_gpu_and_fp32_elsewhere(monkeypatch):
    import torch

    from dinokit.train.build import resolved_precision

    cfg = load_config("demo", ["trainer.accelerator=auto"])
    assert cfg.trainer.precision == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolved_precision(cfg) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolved_precision(cfg) == "bf16-mixed"
    assert resolved_precision(load_config("demo", ["trainer.accelerator=cpu"])) == "32-true"
    assert resolved_precision(load_config("demo", ["trainer.precision=16-mixed"])) == "16-mixed"


# ------------------------------------------------------------------ one vocabulary
def test_every_old_flat_key_is_refused_with_its_new_name():
    from dinokit.config import MOVED_KEYS, all_keys

    for old, new in MOVED_KEYS.items():
        with pytest.raises(ConfigError, match=re.escape(f"config key {old!r} is now {new}")):
            load_config("demo", [f"{old}=1"])
        assert new.split(" ")[0] in all_keys(), new
    section, key = "model", "n_prototypes"  # and in a YAML file's sections
    with pytest.raises(ConfigError, match="is now dino.n_prototypes"):
        from_dict({"data": {"dataset": "demo"}, section: {key: 16}})


def test_a_saved_flat_config_is_upgraded_to_the_sections():
    from dinokit.config import upgrade_saved

    old = {"model": {"method": "dinov2", "backbone": "resnet18", "n_prototypes": 16, "temperature_student": 0.2,
                     "gram_weight": 0.0},
           "data": {"dataset": "demo", "n_local": 3, "mask_mode": "random", "batch_size": 8}}
    cfg = from_dict(upgrade_saved(old))
    assert (cfg.backbone.name, cfg.dino.n_prototypes, cfg.crops.n_local, cfg.ibot.mask_mode) == (
        "resnet18", 16, 3, "random")
    assert cfg.dino.student_temperature == cfg.ibot.student_temperature == 0.2
    assert cfg.data.batch_size == 8 and cfg.model.method == "dinov2"
    assert upgrade_saved(cfg.to_dict()) == cfg.to_dict()  # the sections are left as they are


def test_one_name_per_knob_across_yaml_python_and_the_seed_aliases():
    """A seed keyword is an alias of the one name: it sets the same settings field as the config key."""
    from conftest import tiny_vit
    from dinokit import DINO, DINOv3
    from dinokit.estimator import DINOEstimator
    from dinokit.settings import DinoSettings, MethodSettings

    by_key = DINO(tiny_vit(), settings=MethodSettings(dino=DinoSettings(n_prototypes=12)),
                  projector_hidden_dim=16, projector_bottleneck_dim=8)
    by_alias = DINO(tiny_vit(), n_prototypes=12, projector_hidden_dim=16, projector_bottleneck_dim=8)
    assert by_key.settings == by_alias.settings
    v3 = DINOv3(tiny_vit(num_registers=4), n_cls_prototypes=12, n_patch_prototypes=8, projector_hidden_dim=16,
                projector_bottleneck_dim=8, ema_decay_start=0.99, n_register_tokens=4)
    assert (v3.settings.dino.n_prototypes, v3.settings.teacher.momentum, v3.settings.backbone.n_registers) == (
        12, 0.99, 4)
    est = DINOEstimator(tiny_vit(), proj_output_dim=12, base_lambda=0.99, proj_hidden_dim=16, proj_bottleneck_dim=8)
    s = est._method_settings()
    assert (s.dino.n_prototypes, s.teacher.momentum) == (12, 0.99)
    with pytest.raises(ValueError, match="n_prototypes=12 and settings.dino.n_prototypes=20 disagree"):
        DINO(tiny_vit(), n_prototypes=12, settings=MethodSettings(dino=DinoSettings(n_prototypes=20)))


def test_lr_scaling_none_is_a_choice_not_an_empty_value():
    assert load_config("demo", ["optim.lr_scaling=none"]).optim.lr_scaling == "none"
    assert from_dict({"data": {"dataset": "demo"}, "optim": {"lr_scaling": "none"}}).optim.lr_scaling == "none"
