"""``benchmarks/continue.py --quick``: the continuation benchmark end to end at CI size (a source
model trained and saved in timm's layout, continued with and without the head warm-up and from
scratch), so that the script cannot rot. The report has, per row, the curve's shape: the start
(the source model as is, or the random init for scratch), the fixed points and the end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dinokit.data.datasets import fashion_mnist_available

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not fashion_mnist_available(), reason="needs Fashion-MNIST (classes 0-4 / 5-9)")


def _benchmark():
    spec = importlib.util.spec_from_file_location("continue_benchmark", ROOT / "benchmarks" / "continue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_gives_every_row_its_curve(tmp_path):
    bench = _benchmark()
    md = tmp_path / "B.md"
    assert bench.main(["--quick", "--work", str(tmp_path / "work"), "--md", str(md)]) == 0
    report = json.loads((tmp_path / "work" / "continue_quick.json").read_text())
    b = report["budget"]
    steps = list(range(0, b["steps"] + 1, b["every"]))
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == set(bench.VARIANTS)
    for variant, r in rows.items():
        assert [p["step"] for p in r["points"]] == steps, variant
        assert all(0 <= p["knn_top1"] <= 100 and 0 <= p["linear_top1"] <= 100 for p in r["points"])
    source = json.loads((tmp_path / "work" / f"rows-quick-{b['steps']}" / "dino-resnet10t-source.json").read_text())
    for variant in ("continue + warm-up", "continue, no warm-up"):  # both start from the source as is
        assert rows[variant]["points"][0]["knn_top1"] == source["knn_top1"]
    assert rows["continue + warm-up"]["stage_lengths"] in ({}, {"0": 1})  # a warm-up of 1 step, or early
    verdict = report["table"]["DINO resnet10t"]["continue + warm-up"]["verdict"]
    assert {"no_dip", "gain_ok", "over_scratch_ok", "max_dip_knn"} <= set(verdict)
    assert (tmp_path / "work" / "continue_quick.png").stat().st_size > 0
    assert "<!-- continue:begin -->" in md.read_text()
    sources = list((tmp_path / "work" / "sources").iterdir())
    assert [p.suffix for p in sources] == [".safetensors"]  # timm's layout: backbone only, no heads
