"""The GPU suite (``benchmarks/gpu_suite.sh``) in its dry run: every part that a lent GPU runs,
here on the CPU at toy sizes, so that the script cannot rot between lent devices. Each part
reports figures or one ``skipped: <reason>`` line, the JSON and the Markdown are both written, and
a part that outlives its budget is stopped without stopping the suite. Peers that are not
installed here are skipped with that reason; the test installs nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["env", "step", "data_path", "sync", "gpu_tests", "precision", "fsdp2"]
PEERS = {"stable-pretraining": "stable_pretraining", "lightly": "lightly", "nidl": "nidl"}

pytestmark = pytest.mark.slow


def _suite(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    peers_before = {p: importlib.util.find_spec(m) is not None for p, m in PEERS.items()}
    r = _suite(out)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert {p: importlib.util.find_spec(m) is not None for p, m in PEERS.items()} == peers_before
    report = json.loads((out / "gpu_suite_dry.json").read_text())
    return report, (out / "gpu_suite_dry.md").read_text(), peers_before


def _figures(row: dict) -> bool:
    return "skipped" not in row and "failed" not in row


def test_every_part_reports_figures_or_one_skip_reason(dry_run):
    report, md, _ = dry_run
    assert report["dry_run"] is True
    assert report["order"] == PARTS and list(report["parts"]) == PARTS
    for name, res in report["parts"].items():
        assert res["status"] in ("ok", "skipped"), (name, res.get("reason"))
        assert 0 < res["seconds"] <= res["budget_s"] + 5, name
        if res["status"] == "ok":
            assert any(_figures(r) for r in res["rows"]), name
        else:
            assert res["reason"].startswith("skipped: ") and len(res["reason"]) > len("skipped: "), name
        for row in res["rows"]:  # a row holds figures or says why not
            assert _figures(row) or row.get("skipped", "").startswith("skipped: "), (name, row)
    for name in PARTS:  # one Markdown section per part, with its status line
        assert f"(`{name}`)" in md
    for res in report["parts"].values():
        if res["status"] == "skipped":
            assert res["reason"] in md


def test_the_step_part_measures_dinokit_and_skips_absent_peers_with_the_reason(dry_run):
    report, md, peers_before = dry_run
    rows = report["parts"]["step"]["rows"]
    ours = {r["method"]: r for r in rows if r["library"] == "dinokit"}
    assert set(ours) == {"dino", "dinov2", "dinov3"}
    for r in ours.values():
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_mib"] > 0
        assert r["gflop_per_step"] > 0 and r["tflop_s"] > 0  # counted by FlopCounterMode
    expected = {("dino", p) for p in PEERS} | {(m, p) for m in ("dinov2", "dinov3")
                                               for p in ("stable-pretraining", "lightly")}
    assert {(r["method"], r["library"]) for r in rows if r["library"] != "dinokit"} == expected
    for r in rows:
        if r["library"] in PEERS and not peers_before[r["library"]]:
            assert r["skipped"] == f"skipped: {r['library']} is not installed for {sys.executable}"
            assert r["skipped"] in md


def test_the_other_parts_hold_their_checks(dry_run):
    report, _, _ = dry_run
    parts = report["parts"]
    assert {r["method"]: r["syncs_outside_logging_steps"] for r in parts["sync"]["rows"]} == \
        {"dino": 0, "dinov2": 0, "dinov3": 0}
    assert all(r["syncs_logging_step_dispatch"] > 0 for r in parts["sync"]["rows"])  # the counter counts
    for r in parts["precision"]["rows"]:
        assert r["finite"] and r["loss_rel_diff"] < 0.05 and r["grad_rel_diff"] < 0.2, r
    assert [(r["method"], r["backend"], r["sharded"], r["finite"]) for r in parts["fsdp2"]["rows"]] == \
        [("dino", "gloo", True, True), ("dinov2", "gloo", True, True)]
    paths = {r["path"]: r["images_per_s"] for r in parts["data_path"]["rows"]}
    assert len(paths) == 4 and all(v > 0 for v in paths.values())
    assert any("roi_align" in p for p in paths)
    tests = parts["gpu_tests"]["rows"]
    assert len(tests) == 5  # the EMA device move, CPU/GPU crops, 3 x sync debug mode
    if not torch.cuda.is_available():
        assert parts["gpu_tests"]["reason"] == "skipped: needs a GPU"


def test_a_part_past_its_budget_is_stopped_and_the_next_one_runs(tmp_path):
    """A pytest plugin (loaded through PYTEST_ADDOPTS) stalls the gpu_tests part inside its run."""
    (tmp_path / "stall_plugin.py").write_text("import time\n\ndef pytest_configure(config):\n    time.sleep(600)\n")
    env = {"PYTEST_ADDOPTS": "-p stall_plugin",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = _suite(tmp_path / "out", "--parts", "gpu_tests", "precision", "--budget", "gpu_tests=8",
               "--budget", "precision=200", env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads((tmp_path / "out" / "gpu_suite_dry.json").read_text())
    assert report["order"] == ["gpu_tests", "precision"]
    stalled = report["parts"]["gpu_tests"]
    assert stalled["status"] == "skipped" and stalled["reason"] == "skipped: stopped by its 8 s budget"
    assert 8 <= stalled["seconds"] < 60
    assert report["parts"]["precision"]["status"] == "ok"
    assert "skipped: stopped by its 8 s budget" in (tmp_path / "out" / "gpu_suite_dry.md").read_text()


def test_a_bad_budget_is_one_line_and_exit_2(tmp_path):
    r = _suite(tmp_path, "--budget", "nope=3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("gpu_suite.py: error: --budget 'nope=3'")
    assert "Traceback" not in r.stderr
