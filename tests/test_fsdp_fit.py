"""``trainer.strategy=fsdp`` (FSDP2 through Lightning's ``ModelParallelStrategy``): a real ``fit``
with 2 gloo processes, student and teacher sharded, ends where the 1-process ``fit`` on the full
global batch ends; its checkpoint holds full tensors and resumes in 1 process."""

from __future__ import annotations

import pytest
import torch

from dinokit.cli import main
from test_world_size import (
    GLOBAL_BATCH,
    NO_MASKS_NO_KOLEO,
    STEPS,
    TINY,
    V2,
    _compare,
    _one_process,
    _two_processes,
)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["model.method=dino"], ["model.method=dinov3", *V2, *NO_MASKS_NO_KOLEO]],
                         ids=["dino", "dinov3-sinkhorn"])
def test_fsdp_two_processes_equal_one_process_and_resume_in_one(tmp_path, monkeypatch, extra):
    one = _one_process(tmp_path, extra)
    monkeypatch.setenv("STRATEGY", "fsdp")  # examples/torchrun_single_node.sh passes it on
    two = _two_processes(tmp_path, extra)
    assert two["dinokit"]["fsdp"] and not one["dinokit"]["fsdp"]  # the 2-process run was sharded
    _compare(one, two)
    teacher = {k: v for k, v in two["state_dict"].items() if k.startswith("method.teacher.")}
    assert teacher and all(type(v) is torch.Tensor for v in teacher.values())  # gathered, not sharded
    # the FSDP checkpoint (full tensors) resumes without FSDP in 1 process (same global batch)
    args = ["train", *TINY, *extra, f"data.batch_size={GLOBAL_BATCH}", "trainer.devices=1",
            f"trainer.output_dir={tmp_path}", "trainer.run_name=two", "trainer.resume=last",
            f"trainer.max_steps={STEPS + 1}"]
    assert main(args) == 0
    resumed = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == STEPS + 1


def test_other_fsdp_flavours_are_refused_with_the_key_named(tmp_path, capsys):
    args = ["train", *TINY, "data.batch_size=8", "trainer.strategy=fsdp_cpu_offload",
            f"trainer.output_dir={tmp_path}"]
    assert main(args) == 2
    out = capsys.readouterr()
    assert "trainer.strategy" in out.out + out.err and "Traceback" not in out.out + out.err


@pytest.mark.slow
def test_a_distillation_under_fsdp_equals_one_process_and_keeps_the_teacher_frozen(tmp_path, monkeypatch):
    from test_world_size import INVARIANT

    assert main(["train", *TINY, "model.method=dinov3", *V2, "trainer.max_steps=1", "data.batch_size=8",
                 f"trainer.output_dir={tmp_path}", "trainer.run_name=teacher"]) == 0
    extra = ["model.method=distill", f"model.teacher={tmp_path / 'teacher'}", *V2, *INVARIANT,
             "teacher.warmup_epochs=0"]
    one = _one_process(tmp_path, extra)
    monkeypatch.setenv("STRATEGY", "fsdp")
    two = _two_processes(tmp_path, extra)
    assert two["dinokit"]["fsdp"]
    _compare(one, two)
    # the checkpoints record the teacher's fingerprint, not its weights; the sharded run resumes
    # from one (the teacher rebuilt from model.teacher), and writes it in on request
    assert not any(k.startswith("method.teacher.") for k in two["state_dict"])
    assert two["dinokit"]["external"] == one["dinokit"]["external"]
    resumed = _two_processes(tmp_path, [*extra, "trainer.resume=last", f"trainer.max_steps={STEPS + 1}",
                                        "distillation.checkpoint_teacher=true"])
    assert resumed["global_step"] == STEPS + 1 and "external" not in resumed["dinokit"]
    start = torch.load(tmp_path / "teacher" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    teacher = {k: v for k, v in resumed["state_dict"].items() if k.startswith("method.teacher.")}
    assert teacher and teacher.keys() <= start.keys()
    for k, v in teacher.items():
        assert torch.equal(v, start[k]), k  # the teacher run's EMA teacher and heads, unchanged
