"""The plain trainer (seed 002's fit/train_epoch/validate), the resumable sampler and weight files."""

from __future__ import annotations

import pytest
import torch

from conftest import step_settings
from dinokit import DINO, build_backbone
from dinokit.seeding import sample_seed
from dinokit.train.loader import EpochSampler, ResumableDataLoader, SeededViews
from dinokit.train.trainer import DINOTrainer
from dinokit.weights import WeightsError, backbone_state_dict, load_backbone_file, read_file


def _tiny_backbone(depth=2):
    return build_backbone("vit_tiny_patch16_224", encoder_kwargs=dict(
        img_size=32, patch_size=8, depth=depth, embed_dim=48, num_heads=2))


def _batches(n, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.rand(b, 3, 32, 32, generator=g), torch.rand(b, 3, 32, 32, generator=g),
             torch.rand(b, 3, 16, 16, generator=g)] for _ in range(n)]


def _method(seed=0):
    torch.manual_seed(seed)
    return DINO(_tiny_backbone(), projector_hidden_dim=32, projector_bottleneck_dim=16,
                n_prototypes=16, warmup_epochs_temperature_teacher=2)


def test_plain_trainer_trains_exactly_like_the_lightning_engine():
    """Both loops drive the same method hooks and schedules: identical weights after 2 epochs."""
    import warnings

    import lightning.pytorch as pl

    from dinokit.train import DINOModule

    data = _batches(3)
    plain = _method()
    trainer = DINOTrainer(plain, data, settings=step_settings(lr=0.01, lr_scaling="none", warmup_epochs=1,
                                                              freeze_last_layer_epochs=1), epochs=2, device="cpu")
    history = trainer.fit()
    assert [h.epoch for h in history] == [0, 1] and trainer.global_step == 6

    engine = _method()
    module = DINOModule(engine, step_settings(lr=0.01, lr_scaling="none", warmup_epochs=1,
                        freeze_last_layer_epochs=1))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    for (name, a), b in zip(plain.state_dict().items(), engine.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(plain.student_head.mlp[0].weight, _method().student_head.mlp[0].weight)


def test_plain_trainer_validate_leaves_the_centre_alone():
    method = _method()
    trainer = DINOTrainer(method, _batches(1), val_loader=_batches(2, seed=1), epochs=1,
                          device="cpu")
    centre = method.dino_loss.center.clone()
    loss = trainer.validate()
    assert torch.equal(method.dino_loss.center, centre) and loss > 0
    with pytest.raises(ValueError, match="val_loader"):
        DINOTrainer(method, _batches(1), epochs=1, device="cpu").validate()


def test_sampler_is_deterministic_per_epoch_and_resumes():
    s = EpochSampler(10, seed=1)
    first = list(s)
    assert sorted(i % 10 for i in first) == list(range(10)) and first == list(s)
    s.set_epoch(1)
    second = list(s)
    assert [i // 10 for i in second] == [1] * 10 and [i % 10 for i in second] != [i % 10 for i in first]
    s.start = 4
    assert list(s) == second[4:]
    assert len(s) == 10  # the full epoch, also when resuming


def test_sampler_shards_over_processes(monkeypatch):
    import dinokit.train.loader as loader

    shards = []
    for rank in range(3):
        monkeypatch.setattr(loader, "rank_world", lambda r=rank: (r, 3))
        shards.append([i % 10 for i in EpochSampler(10, seed=0)])
    assert all(len(x) == 3 for x in shards)
    assert len(set(shards[0]) | set(shards[1]) | set(shards[2])) == 9  # disjoint, tail dropped


def test_seeded_views_do_not_depend_on_order_or_global_rng():
    ds = SeededViews([torch.zeros(1)] * 4, lambda x: torch.rand(3), seed=5)
    a = ds[2]
    torch.manual_seed(123)
    _ = ds[0]
    assert torch.equal(ds[2][0], a[0]) and a[1] == -1
    assert not torch.equal(ds[6][0], a[0])  # same image, next epoch: new crops
    assert sample_seed(0, 0, 1) != sample_seed(0, 1, 0)


def test_a_samples_seed_touches_the_cpu_generator_only(monkeypatch):
    """A sample's crops and a batch's masks are drawn from the CPU generator, seeded per sample and
    restored after: the accelerators' generators are left alone (seeding them costs a formatted
    stack trace a sample where CUDA is not initialised, and would reseed the training device's
    generator from the loader where it is)."""
    from dinokit.train.loader import SeededCollate

    def refuse(*_a, **_k):
        raise AssertionError("an accelerator generator was seeded")

    for module in (torch.cuda, torch.xpu, torch.mtia):
        monkeypatch.setattr(module, "manual_seed_all", refuse)
    ds = SeededViews([torch.zeros(1)] * 4, lambda x: torch.rand(3), seed=5)
    before = torch.get_rng_state()
    a = ds[2]
    assert torch.equal(torch.get_rng_state(), before)  # the CPU generator restored
    torch.default_generator.manual_seed(sample_seed(5, 0, 2))
    assert torch.equal(a[0], torch.rand(3))  # the sample's own seed drew its crops
    batch = ds.__getitems__([0, 1])
    SeededCollate(lambda items: torch.rand(2), seed=5)(batch)


def test_loader_state_round_trip():
    ds = SeededViews(list(torch.arange(12.0)), lambda x: x, seed=0)
    dl = ResumableDataLoader(ds, batch_size=3, seed=0)
    it = iter(dl)
    next(it), next(it)
    state = dl.state_dict()
    assert state == {"epoch": 0, "batches": 2, "batch_size": 3, "world": 1}  # global batch 3 x 1
    rest = [b[0] for b in it]
    dl2 = ResumableDataLoader(ds, batch_size=3, seed=0)
    dl2.load_state_dict(state)
    assert all(torch.equal(a, b[0]) for a, b in zip(rest, dl2, strict=True))


def test_backbone_weights_from_checkpoints_and_mismatches(tmp_path):
    torch.manual_seed(0)
    method = DINO(_tiny_backbone(), projector_hidden_dim=32, projector_bottleneck_dim=16,
                  n_prototypes=16)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"method.{k}": v for k, v in method.state_dict().items()
                               if isinstance(v, torch.Tensor)}}, ckpt)
    fresh = _tiny_backbone()
    load_backbone_file(fresh, ckpt)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x).cls, method.teacher_backbone(x).cls)
    # timm-named keys (no "model." prefix) load too
    plain = backbone_state_dict(read_file(ckpt))
    assert "cls_token" in plain and not any(k.startswith("model.") for k in plain)
    with pytest.raises(WeightsError, match="missing keys") as e:
        load_backbone_file(_tiny_backbone(depth=3), ckpt)
    assert "blocks.2" in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a dinokit/timm checkpoint"):
        read_file(tmp_path / "junk.pt")
    with pytest.raises(WeightsError, match="does not exist"):
        read_file(tmp_path / "nope.pt")


def test_plain_trainer_ends_a_warm_up_early_on_the_teacher_entropy():
    """The plain loop reads the teacher entropy at its logging steps as the Lightning engine does:
    ``until_teacher_entropy: 1.0`` (any entropy is below ln K) ends the frozen warm-up after step 0,
    so the backbone trains from step 1 on; a threshold never reached keeps it frozen."""
    from dinokit.settings import StageSettings

    def run(threshold):
        method = _method()
        start = {k: v.clone() for k, v in method.student_backbone.state_dict().items()}
        stages = [StageSettings(name="heads", steps=5, frozen=["backbone"], until_teacher_entropy=threshold),
                  StageSettings(name="all")]
        trainer = DINOTrainer(method, _batches(3), settings=step_settings(lr=0.01, lr_scaling="none"),
                              stages=stages, epochs=2, log_every_n_steps=1, device="cpu")
        trainer.train_epoch()  # steps 0-2, all inside the planned warm-up
        moved = any(not torch.equal(v, start[k]) for k, v in method.student_backbone.state_dict().items())
        return trainer.step_fn.state_dict()["stage_lengths"], moved

    assert run(1.0) == ({0: 1}, True)
    assert run(1e-6) == ({}, False)
