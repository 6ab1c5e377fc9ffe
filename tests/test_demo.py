"""The README's main job: its preset, its report table (k-NN beside the linear probe) and a tiny
end-to-end run of ``dinokit demo`` on digits."""

from __future__ import annotations

import json
import math
import warnings

import torch

from dinokit.config import load_config
from dinokit.demo import MAIN_JOB_PRESET, DemoReport, draw_pictures, run_demo
from dinokit.train.build import build_method


def test_main_job_preset_is_the_small_cnn_recipe():
    cfg = load_config(MAIN_JOB_PRESET)
    assert MAIN_JOB_PRESET == "demo_cnn"
    assert cfg.model.method == "dino" and cfg.backbone.name == "resnet10t"
    assert cfg.backbone.kwargs == {"in_chans": 1} and cfg.heads.batch_norm is True
    assert cfg.data.channels == 1 and cfg.data.dataset == "demo" and cfg.trainer.accelerator == "cpu"


def test_table_prints_linear_beside_knn_and_a_dash_where_missing(tmp_path):
    r = DemoReport(tmp_path, {"DINO teacher (trained)": 80.5, "raw pixels": 82.8}, 20, 2.0, 256,
                   linear={"DINO teacher (trained)": 84.25})
    lines = r.table().splitlines()
    assert lines[2].split() == ["k-NN", "linear"]
    assert lines[3] == "  DINO teacher (trained)   80.50 %   84.25 %"
    assert lines[4] == "  raw pixels               82.80 %         -"
    assert lines[5] == f"final training loss 2.000 (ln K = {math.log(256):.3f} would mean uniform collapse)"


def test_demo_runs_end_to_end_on_digits(tmp_path):
    overrides = ["data.dataset=digits", "data.limit=128", "data.val_limit=100", "data.batch_size=32",
                 "data.num_workers=0", "trainer.epochs=1", "trainer.progress=false",
                 "trainer.log_every_n_steps=1", "dino.n_prototypes=32", "heads.hidden_dim=32",
                 "heads.bottleneck_dim=16", "backbone.kwargs={in_chans: 1, channels: [8, 16, 32, 64]}",
                 f"trainer.output_dir={tmp_path}", "trainer.run_name=d"]
    report = run_demo(overrides, probe_epochs=2)
    names = ["DINO teacher (trained)", "same backbone, random init", "raw pixels"]
    assert list(report.knn) == names and list(report.linear) == names
    assert all(0 <= v <= 100 for v in [*report.knn.values(), *report.linear.values()])
    saved = json.loads((tmp_path / "d" / "eval" / "demo_knn.json").read_text())
    assert saved["linear_top1"] == report.linear and saved["top1"] == report.knn
    assert (tmp_path / "d" / "pictures" / "tsne.png").is_file()


def test_the_pictures_of_a_vit_run_hold_pca_maps_and_the_segmentation_probe(tmp_path):
    cfg = load_config("demo", ["data.dataset=digits", "data.val_limit=20",
                               "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 16, "
                               "num_heads: 2, in_chans: 1}", "dino.n_prototypes=16"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = draw_pictures(cfg, build_method(cfg), tmp_path, n_images=3)
    names = {p.name for p in written}
    assert {"pca.png", "segmentation.png"} <= names
    assert (tmp_path / "pictures" / "segmentation.png").stat().st_size > 0
