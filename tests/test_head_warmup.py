"""The head warm-up stage of continued pretraining, through the CLI on tiny models.

A stage with ``frozen: [backbone]`` keeps the backbone of student and teacher bit-identical,
parameters and BatchNorm buffers alike, while the heads learn; ``until_teacher_entropy`` ends it
early at a logging step, the later stages move up, and the realised boundary is saved so a run
resumed after the early end equals an uninterrupted one; ``skip_with_init_heads`` skips it when
``model.init_weights`` is a dinokit run (trained heads), and only then.
"""

from __future__ import annotations

import csv
import warnings

import pytest
import torch

from dinokit.cli import main
from dinokit.config import ConfigError, load_config

CNN = [
    "--config", "demo_cnn", "data.dataset=digits", "data.limit=192", "data.batch_size=32",
    "data.num_workers=0", "trainer.epochs=3", "trainer.progress=false", "trainer.log_every_n_steps=1",
    "backbone.name=resnet10t", "backbone.kwargs={in_chans: 1}", "dino.n_prototypes=64", "heads.hidden_dim=32",
    "heads.bottleneck_dim=16", "crops.n_local=1", "optim.warmup_epochs=0", "optim.min_lr=0.0005",
    "optim.lr=0.0005", "optim.weight_decay_end=0.04", "teacher.momentum=0.996", "teacher.final_momentum=0.996",
    "trainer.precision=32", "trainer.accelerator=cpu",
]
WARMUP = "stages=[{name: heads, steps: 4, frozen: [backbone]}, {name: all}]"
EARLY = "stages=[{name: heads, steps: 5, frozen: [backbone], until_teacher_entropy: 1.0}, {name: all}]"
SKIP = "stages=[{name: heads, steps: 4, frozen: [backbone], skip_with_init_heads: true}, {name: all}]"


def _train(tmp_path, name, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["train", *CNN, f"trainer.output_dir={tmp_path}", f"trainer.run_name={name}", *extra])


def _ckpt(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def _stages_logged(run_dir) -> list[tuple[int, int]]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").read_text().splitlines()))
    return [(int(r["step"]), int(float(r["train/stage"]))) for r in rows if r.get("train/stage")]


def test_the_warm_up_keeps_a_batchnorm_backbone_bit_identical_in_student_and_teacher(tmp_path):
    """Parameters and BatchNorm running statistics of both backbones are untouched after the
    warm-up (the teacher's frozen BatchNorm runs in eval mode like the student's), the heads
    moved, and the next stage moves the backbone."""
    assert _train(tmp_path, "start", "trainer.max_steps=1", "stages=[{name: heads, steps: 1, frozen: "
                  "[backbone, heads]}, {name: all}]") == 0  # a run that changed nothing: the start
    start = _ckpt(tmp_path / "start" / "checkpoints" / "last.ckpt")["state_dict"]
    assert _train(tmp_path, "warm", "trainer.max_steps=4", WARMUP) == 0
    warm = _ckpt(tmp_path / "warm" / "checkpoints" / "last.ckpt")["state_dict"]
    backbone = {k: v for k, v in warm.items() if ".backbone." in k}
    assert any(k.startswith("method.teacher.backbone.") and "running_mean" in k for k in backbone)
    for k, v in backbone.items():
        assert torch.equal(v, start[k]), k
    assert any(not torch.equal(warm[k], start[k]) for k in warm if k.startswith("method.student.head."))
    assert _train(tmp_path, "warm", "trainer.max_steps=6", "trainer.resume=last", WARMUP) == 0
    after = _ckpt(tmp_path / "warm" / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(after[k], start[k]) for k in backbone if "running_mean" not in k)


def test_an_entropy_early_end_moves_the_next_stage_and_resumes_exactly(tmp_path):
    """``until_teacher_entropy: 1.0`` ends the warm-up at its first logging step (step 0): the
    second stage starts at step 1, the checkpoint records the realised length, and a run cut after
    the early end and resumed ends bit-identical to an uninterrupted one."""
    assert _train(tmp_path, "ref", "trainer.max_steps=6", EARLY) == 0
    ref = tmp_path / "ref"
    assert _stages_logged(ref)[:2] == [(0, 0), (1, 1)]
    a = _ckpt(ref / "checkpoints" / "last.ckpt")
    assert a["dinokit"]["step"]["stage_lengths"] == {0: 1}
    assert _train(tmp_path, "cut", "trainer.max_steps=3", EARLY) == 0
    assert _train(tmp_path, "cut", "trainer.max_steps=6", "trainer.resume=last", EARLY) == 0
    b = _ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=f"{k} differs")


def test_a_threshold_not_reached_runs_the_whole_warm_up(tmp_path):
    low = EARLY.replace("until_teacher_entropy: 1.0", "until_teacher_entropy: 0.001")
    assert _train(tmp_path, "low", "trainer.max_steps=6", low) == 0
    assert [s for _, s in _stages_logged(tmp_path / "low")] == [0, 0, 0, 0, 0, 1]
    assert _ckpt(tmp_path / "low" / "checkpoints" / "last.ckpt")["dinokit"]["step"]["stage_lengths"] == {}


def test_heads_from_a_dinokit_run_skip_the_warm_up_and_a_backbone_file_does_not(tmp_path):
    assert _train(tmp_path, "first", "trainer.max_steps=2", "stages=[]") == 0
    run_ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert _train(tmp_path, "again", "trainer.max_steps=3", SKIP, f"model.init_weights={run_ckpt}") == 0
    assert [s for _, s in _stages_logged(tmp_path / "again")] == [1, 1, 1]
    assert _ckpt(tmp_path / "again" / "checkpoints" / "last.ckpt")["dinokit"]["step"]["stage_lengths"] == {0: 0}
    assert main(["export", "--checkpoint", str(tmp_path / "first"), "--output", str(tmp_path / "bb")]) == 0
    assert _train(tmp_path, "fresh", "trainer.max_steps=3", SKIP,
                  f"model.init_weights={tmp_path / 'bb.safetensors'}") == 0
    assert [s for _, s in _stages_logged(tmp_path / "fresh")] == [0, 0, 0]


@pytest.mark.parametrize("stages, message", [
    ("[{name: a, steps: 2}, {name: b, until_teacher_entropy: 0.5}]",
     r"stages\[1\].until_teacher_entropy: the last stage runs to the end"),
    ("[{name: a, steps: 2}, {name: b, skip_with_init_heads: true}]", r"stages\[1\].skip_with_init_heads"),
    ("[{name: a, steps: 2, until_teacher_entropy: 0.5}, {name: b, crops: {global_size: 16}}]",
     r"stages\[1\].crops: a stage with its own crops cannot start where an earlier stage"),
    ("[{name: a, steps: 2, skip_with_init_heads: true}, {name: b, steps: 5}, {name: c, crops: {global_size: 16}}]",
     r"stages\[2\].crops: a stage with its own crops cannot start where"),
    ("[{name: a, steps: 2, until_teacher_entropy: 1.5}, {name: b}]", r"until_teacher_entropy: must be <= 1"),
])
def test_stages_that_cannot_move_are_refused(stages, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [f"stages={stages}"])
