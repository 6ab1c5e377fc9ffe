"""Stages: a run made of spans with their own overrides, through the CLI.

A head warm-up stage keeps the backbone (student and teacher) bit-identical while the heads learn,
then everything trains; a run interrupted inside either stage and resumed ends bit-identical to an
uninterrupted one (the clock places the stages by step, and the step is in the checkpoint).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from dinokit.cli import main
from dinokit.config import ConfigError, load_config
from dinokit.train.build import build_method

TINY = [
    "--config", "demo", "data.dataset=digits", "data.limit=192", "data.batch_size=32", "data.num_workers=0",
    "trainer.epochs=2", "trainer.progress=false", "trainer.log_every_n_steps=1",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
    "dino.n_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    # schedules that do not depend on the run length, so a cut run resumed with a larger max_steps compares
    "optim.warmup_epochs=0", "optim.min_lr=0.0005", "optim.lr=0.0005", "optim.weight_decay_end=0.04",
    "teacher.momentum=0.996", "teacher.final_momentum=0.996",
    "stages=[{name: heads, steps: 4, frozen: [backbone]}, {name: all, warmup_epochs: 0.5}]",
]


def _train(tmp_path, name, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["train", *TINY, f"trainer.output_dir={tmp_path}", f"trainer.run_name={name}", *extra])


def _ckpt(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def _backbones(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".backbone." in k and isinstance(v, torch.Tensor)}


def test_a_head_warm_up_keeps_the_backbone_and_a_cut_run_resumes_exactly_in_each_stage(tmp_path):
    assert _train(tmp_path, "ref", "trainer.max_steps=10") == 0
    assert _train(tmp_path, "cut", "trainer.max_steps=2") == 0  # inside the head warm-up
    assert _train(tmp_path, "cut", "trainer.max_steps=4", "trainer.resume=last") == 0  # its last step
    warm = _ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert warm["global_step"] == 4
    pl.seed_everything(0, workers=True, verbose=False)  # what fit does before building the method
    start = build_method(load_config("demo", [t for t in TINY[2:]]))
    start_state = {f"method.{k}": v for k, v in start.state_dict().items()}
    backbone = _backbones(warm["state_dict"])
    assert any(k.startswith("method.teacher.") for k in backbone)
    for k, v in backbone.items():  # student and teacher backbones untouched, bit for bit
        assert torch.equal(v, start_state[k]), k
    heads = [k for k in warm["state_dict"] if k.startswith("method.student.head.")]
    assert any(not torch.equal(warm["state_dict"][k], start_state[k]) for k in heads)  # the heads learned
    assert _train(tmp_path, "cut", "trainer.max_steps=7", "trainer.resume=last") == 0  # inside stage 2
    assert _train(tmp_path, "cut", "trainer.max_steps=10", "trainer.resume=last") == 0
    a = _ckpt(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = _ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 10
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=f"{k} differs")
    moved = _backbones(a["state_dict"])
    assert any(not torch.equal(v, start_state[k]) for k, v in moved.items())  # stage 2 trained them


def test_the_stage_is_logged_and_checkpointed(tmp_path):
    assert _train(tmp_path, "log", "trainer.max_steps=6") == 0
    import csv

    rows = list(csv.DictReader((tmp_path / "log" / "logs" / "metrics.csv").read_text().splitlines()))
    stages = [float(r["train/stage"]) for r in rows if r.get("train/stage")]
    assert stages[0] == 0.0 and stages[-1] == 1.0
    cfg = _ckpt(tmp_path / "log" / "checkpoints" / "last.ckpt")["dinokit"]["config"]
    assert [s["name"] for s in cfg["stages"]] == ["heads", "all"]


@pytest.mark.parametrize("stages, message", [
    ("[{name: a, steps: 2, epochs: 1}]", "give steps, epochs or fraction, not steps and epochs"),
    ("[{name: a}, {name: b}]", "only one stage may leave out its length"),
    ("[{name: a, steps: 2, weights: {gram: 0}}]", "weights.gram: the method has no gram term"),
    ("[{name: a, steps: 2, weights: {dinov: 1}}]", "unknown loss term 'dinov'"),
    ("[{name: a, step: 2}]", "unknown key 'step'; did you mean 'steps'"),
    ("[{name: a, steps: 0}]", r"stages\[0\].steps: must be >= 1"),
])
def test_bad_stages_name_the_stage_and_key(stages, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [f"stages={stages}"])


def test_a_stage_freezing_an_unknown_part_is_refused_before_training(tmp_path, capsys):
    assert _train(tmp_path, "bad", "stages=[{name: a, steps: 2, frozen: [neck]}]") == 2
    assert "neck" in capsys.readouterr().err


# ------------------------------------------------------------------ stages with their own crops
CROPS = ["stages=[{name: low, steps: 3, crops: {global_size: 16, local_size: 8, n_local: 1}}, {name: high}]",
         "crops.n_local=2"]


def test_a_stage_with_its_own_crops_feeds_its_steps_those_crops():
    """The loader gives the samples of each optimiser step the crops of that step's stage: 16/8 px
    and 1 local crop for steps 0-2, then the run's 28/16 px (the demo preset) and 2 local crops."""
    from dinokit.train.build import build_train_loader

    tiny = [t for t in TINY[2:] if not t.startswith("stages=")] + CROPS
    cfg = load_config("demo", tiny)
    torch.manual_seed(0)
    method = build_method(cfg)
    shapes = []
    for step, batch in enumerate(build_train_loader(cfg, method)):
        shapes.append((step, batch["global_views"][0].shape[-1], batch["local_views"][0].shape[-1],
                       len(batch["local_views"])))
        if step == 4:
            break
    assert shapes == [(0, 16, 8, 1), (1, 16, 8, 1), (2, 16, 8, 1), (3, 28, 16, 2), (4, 28, 16, 2)]


def test_a_run_whose_stages_change_the_crops_resumes_exactly_across_the_boundary(tmp_path):
    extra = [t for t in TINY if t.startswith("stages=")]
    crops = ["stages=[{name: low, steps: 4, crops: {global_size: 16, local_size: 8, n_local: 1}}, {name: high}]",
             "crops.n_local=2", "data.num_workers=1"]
    assert extra  # the TINY stages are replaced by these
    assert _train(tmp_path, "ref", "trainer.max_steps=7", *crops) == 0
    assert _train(tmp_path, "cut", "trainer.max_steps=3", *crops) == 0  # inside the low-resolution stage
    assert _train(tmp_path, "cut", "trainer.max_steps=7", "trainer.resume=last", *crops) == 0
    a = _ckpt(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = _ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 7
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=f"{k} differs")


@pytest.mark.parametrize("extra, message", [
    (["stages=[{name: a, steps: 2, crops: {n_global: 3}}]"], "'n_global' is not a crop setting a stage may change"),
    (["stages=[{name: a, steps: 2, crops: {global_size: 16}}]", "data.augment_on=device"],
     "needs them made in the loader workers"),
])
def test_bad_stage_crops_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", extra)
