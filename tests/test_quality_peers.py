"""The peer side of benchmarks/quality.py: the recipe a peer is built with, the per-row cache and
the peer training loop's schedules (benchmarks/peer_quality.py), without running any peer."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dinokit.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = load("quality")
peer_quality = load("peer_quality")


def test_the_recipe_takes_the_resolved_learning_rate_and_refuses_layer_decay():
    """The peers' loop scales every learning rate alike: a recipe with the official DINOv2
    layer-wise decay (what ``optim.layer_decay`` left unset means) cannot be given to it."""
    v2 = quality.peer_recipe(load_config("dinov2_tiny_cpu"))
    assert (v2["lr"], v2["lr_scaling"], v2["lr_reference_batch"]) == (0.008, "linear", 256)
    official = load_config("dinov2_tiny_cpu", ["optim.layer_decay=null", "optim.patch_embed_lr_mult=null"])
    with pytest.raises(SystemExit, match="layer-wise"):
        quality.peer_recipe(official)


def test_the_recipe_resolves_each_methods_official_choices():
    dino = quality.peer_recipe(load_config("demo", ["trainer.max_steps=7", "trainer.seed=3"]))
    v2 = quality.peer_recipe(load_config("dinov2_tiny_cpu"))
    v3 = quality.peer_recipe(load_config("dinov3_tiny_cpu", ["gram.weight=0"]))
    # DINO: the demo preset's own values, DINO's official clipping, no KoLeo.
    assert (dino["teacher_temp"], dino["ema_start"], dino["prototypes"]) == (0.04, 0.98, 256)
    assert (dino["max_steps"], dino["seed"], dino["koleo_weight"]) == (7, 3, 0.0)
    assert dino["clip_mode"] == "per_param" and dino["norm_last_layer"] is True
    # DINOv2/v3: Sinkhorn centring, separate heads, per-module clipping, the preset's KoLeo and masks.
    for r in (v2, v3):
        assert (r["centering"], r["ibot_shared_head"], r["clip_mode"]) == ("sinkhorn", False, "per_module")
        assert (r["teacher_temp"], r["ibot_prototypes"], r["koleo_weight"]) == (0.03, 256, 0.1)
        assert r["mask_ratio_range"] == [0.1, 0.5] and r["mask_probability"] == 0.5
    assert (v2["n_registers"], v3["n_registers"]) == (0, 4)
    assert (v2["weight_norm"], v3["weight_norm"]) == (True, True)  # the v3 preset sets it
    assert dino["crops"]["n_local"] == 4 and dino["crops"]["global_size"] == 28


def test_every_peer_row_names_a_peer_its_library_and_a_dinokit_run():
    assert set(quality.ALL_PEERS) == set(quality.PEER_OWN) == {*quality.PEERS, *quality.PEER_TRIALS}
    for lib, peer, run in quality.ALL_PEERS.values():
        assert peer in peer_quality.PEERS and peer.startswith(lib)
        assert run in quality.RUNS and lib in quality.PEER_PACKAGES


def test_the_row_cache_returns_a_row_only_for_the_same_budget(tmp_path):
    cache = quality.RowCache(tmp_path, {"steps": 64}, [])
    assert cache.get("DINOv2", 1) is None
    cache.put("stable-pretraining DINOv2", 1, {"knn_top1": 55.0})
    assert cache.get("stable-pretraining DINOv2", 1) == {"knn_top1": 55.0}
    assert quality.RowCache(tmp_path, {"steps": 65}, []).get("stable-pretraining DINOv2", 1) is None
    assert quality.RowCache(tmp_path, {"steps": 64}, ["a=1"]).get("stable-pretraining DINOv2", 1) is None
    assert quality.RowCache(None, {"steps": 64}, []).get("stable-pretraining DINOv2", 1) is None


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.04), (1, 0.055), (2, 0.07), (9, 0.07)])
def test_the_peers_teacher_temperature_warms_up_by_epoch(epoch, expected):
    r = {"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3}
    assert peer_quality.teacher_temperature(r, epoch) == pytest.approx(expected)
    assert peer_quality.teacher_temperature({**r, "warmup_teacher_temp_epochs": 0}, 0) == 0.07


def test_the_peers_schedules_warm_up_then_follow_a_cosine():
    assert peer_quality.warmup_cosine(0, 1.0, 0.0, 10, 3) == 0.0
    assert peer_quality.warmup_cosine(2, 1.0, 0.0, 10, 3) == 1.0
    assert peer_quality.warmup_cosine(3, 1.0, 0.0, 10, 3) == 1.0
    assert peer_quality.warmup_cosine(10, 1.0, 0.0, 10, 3) == 0.0
    assert peer_quality.warmup_cosine(5, 0.98, 1.0, 10, 0) == pytest.approx(0.99)


def test_a_benchmark_never_mixes_digits_with_fashion_mnist(monkeypatch, tmp_path, capsys):
    """Where Fashion-MNIST is missing, the demo data falls back to digits: a full benchmark stops
    with one line, a --quick one says so and names the data in its budget; old reports (all on
    Fashion-MNIST) merge with new Fashion-MNIST ones, never with digits ones."""
    import json

    import dinokit.data.datasets as datasets

    common = sys.modules["common"]  # benchmarks/common.py, imported by quality.py
    monkeypatch.setattr(datasets, "fashion_mnist_available", lambda *a, **k: False)
    with pytest.raises(SystemExit, match="Fashion-MNIST is not installed.*not comparable"):
        common.demo_data(strict=True, what="quality.py")
    assert common.demo_data(strict=False, what="quality.py") == "digits"
    assert "these figures are on digits" in capsys.readouterr().err
    monkeypatch.setattr(datasets, "fashion_mnist_available", lambda *a, **k: True)
    assert common.demo_data(strict=True, what="quality.py") == "fashion-mnist"

    budget = {"limit": 12000, "batch": 64}
    paths = []
    for name, data in (("old", None), ("new", "fashion-mnist"), ("digits", "digits")):
        b = dict(budget) if data is None else {**budget, "data": data}
        report = {"mode": "full", "budget": b, "date": "d", "command": name, "total_wall_s": 1.0,
                  "total_cpu_s": 1.0, "runs": {"DINO": {"seeds": {"0": {"knn_top1": 1.0}}}}}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    assert quality.merge_reports(paths[:2])["budget"]["data"] == "fashion-mnist"
    with pytest.raises(SystemExit, match="different budgets"):
        quality.merge_reports(paths)


def test_dense_benchmark_trains_long_rows_for_seed_0_and_demo_rows_for_the_demo_seeds():
    """``dense.py --seeds 1`` (a later start for one more seed) adds that seed's short rows, not a
    second set of long or demo-budget rows; ``--tiers`` keeps the tiers named; the demo-budget rows
    run for ``--demo-seeds`` (seed 0 by default)."""
    dense = load("dense")
    assert {tier for _, _, tier in dense.rows_wanted([1], None)} == {"short"}
    rows = dense.rows_wanted([0, 1, 2], None)
    assert {(m, s) for m, s, tier in rows if tier == "long"} == {(m, 0) for m in dense.LONG}
    assert {(m, s) for m, s, tier in rows if tier == "demo"} == {(m, 0) for m in dense.METHODS}
    assert {tier for _, _, tier in dense.rows_wanted([0], None, ("demo",))} == {"demo"}
    # ``--demo-seeds 1 2`` adds those seeds' demo-budget rows, after every short row, and no long row
    spread = dense.rows_wanted([1, 2], ["DINO"], ("short", "long", "demo"), (1, 2))
    assert spread == [("DINO", 1, "short"), ("DINO", 1, "demo"), ("DINO", 2, "short"), ("DINO", 2, "demo")]
    assert dense.rows_wanted([1], ["DINO"], ("demo",), (0, 2)) == []
    assert dense.tier_of({"long": True}) == "long" and dense.tier_of({"long": False}) == "short"


def test_the_dense_ceiling_row_reads_each_patchs_class_fractions():
    """The "patch labels" features: the share of each class among the pixels of each grid cell,
    against fractions counted by hand on a 4 x 4 mask cut into 2 x 2 cells."""
    dense = load("dense")
    mask = torch.tensor([[0, 0, 1, 1],
                         [0, 2, 1, 1],
                         [2, 2, 0, 0],
                         [2, 2, 0, 1]])
    f = dense._patch_labels(mask[None], 3, 2)
    assert f.shape == (1, 3, 2, 2)
    torch.testing.assert_close(f[0, :, 0, 0], torch.tensor([0.75, 0.0, 0.25]))
    torch.testing.assert_close(f[0, :, 0, 1], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(f[0, :, 1, 0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(f[0, :, 1, 1], torch.tensor([0.75, 0.25, 0.0]))


def test_the_peer_table_names_each_rows_seeds():
    """Rows merged from jobs that reached different seeds say which they have."""
    run = {"seeds": {"0": {}, "2": {}}, "aggregate": {"knn_top1": {"mean": 70.0, "std": 1.0, "n": 2}}}
    report = {"budget": {"limit": 1, "batch": 1, "total_steps": 1, "n_local": 4, "bank": 1, "test": 1},
              "seeds": [0, 1, 2], "runs": {"DINO": run, "stable-pretraining DINO": {**run, "seeds": {"0": {}}}},
              "machine": "m", "threads": 1, "date": "d", "total_wall_s": 1.0, "total_cpu_s": 1.0,
              "versions": {}, "command": "c"}
    rows = [line for line in quality.peer_markdown(report, None).splitlines() if line.startswith("| DINO |")]
    assert rows[0].startswith("| DINO | dinokit | 0, 2 |")
    assert rows[1].startswith("| DINO | stable-pretraining | 0 |")


def test_distill_benchmark_trains_its_teacher_again_only_when_a_student_needs_its_weights(tmp_path, monkeypatch):
    """Results kept without their run folders: the table is made from the cached rows without any
    training; a missing student row first trains the teacher again (its weights are gone), then
    the student against the new teacher's folder."""
    distill = load("distill")
    calls: list[tuple[str, str]] = []

    def fake_train(preset, overrides, args, seed, score_network="deployed"):
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.run_name="))
        teacher = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.teacher=")), "")
        calls.append((name, teacher))
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        return {"knn_top1": 1.0, "linear_top1": 2.0, "wall_s_per_step": 0.1, "cpu_s_per_step": 0.1,
                "steps": 1, "run_dir": str(run_dir)}

    monkeypatch.setattr(distill, "train_and_score", fake_train)
    monkeypatch.setattr(distill, "demo_data", lambda **_: "fashion-mnist")
    argv = ["--seeds", "1", "--students", "vit_2x32", "--peer-seeds", "0", "--no-one-view",
            "--out", str(tmp_path / "out"), "--md", str(tmp_path / "B.md")]
    assert distill.main(argv) == 0
    assert [c[0] for c in calls] == ["teacher", "distill-vit_2x32-0", "scratch-vit_2x32-0"]
    teacher_dir = str(tmp_path / "runs" / "teacher")
    assert calls[1][1] == teacher_dir

    shutil.rmtree(teacher_dir)
    calls.clear()
    assert distill.main(argv) == 0          # every row cached: nothing trains
    assert calls == []
    (tmp_path / "out" / "vit_2x32" / "distill" / "0.json").unlink()
    assert distill.main(argv) == 0
    assert calls == [("teacher", ""), ("distill-vit_2x32-0", teacher_dir)]
    assert (tmp_path / "runs" / "teacher").is_dir()
    calls.clear()                           # --first-seed: one seed of the command in another process
    assert distill.main([*argv, "--first-seed", "1"]) == 0
    assert calls == [("distill-vit_2x32-1", teacher_dir), ("scratch-vit_2x32-1", "")]
    # a later seed in a fresh --out does not train the teacher: processes would race on its folder
    with pytest.raises(SystemExit) as stop:
        distill.main([*argv[:-4], "--out", str(tmp_path / "fresh"), "--md", str(tmp_path / "B.md"), "--first-seed", "1"])
    assert stop.value.code == 2 and calls[-1][0] == "scratch-vit_2x32-1"
