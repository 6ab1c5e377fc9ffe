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
    ("[{name: a, steps: 2, epochs: 1}]", "give steps or epochs, not both"),
    ("[{name: a}, {name: b, steps: 2}]", "only the last stage may leave out its length"),
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
