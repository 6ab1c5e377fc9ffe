"""The training-curves picture: what each panel draws, on which axis."""

from __future__ import annotations

from pathlib import Path

import pytest

import dinokit.viz.curves as curves

DINO_CSV = ("epoch,step,train/loss,train/loss_cls,train/lr,train/teacher_momentum,train/teacher_temperature\n"
            "0,0,5.0,5.0,0.1,0.996,0.04\n0,10,4.0,4.0,0.08,0.998,0.055\n0,20,3.0,3.0,0.05,1.0,0.07\n")
DINOV2_CSV = ("epoch,step,train/loss,train/loss_cls,train/loss_patch,train/loss_koleo\n"
              "0,0,9.0,5.0,4.5,-0.5\n0,10,8.0,4.5,4.0,-0.5\n")


@pytest.fixture
def drawn(tmp_path, monkeypatch):
    """``csv text -> {panel title: {line label: y values}}`` of the figure that would be saved."""
    figures = []
    monkeypatch.setattr(curves, "save", lambda fig, path: figures.append(fig) or Path(path))

    def draw(text: str) -> dict[str, dict[str, list[float]]]:
        run = tmp_path / f"run{len(figures)}"
        (run / "logs").mkdir(parents=True)
        (run / "logs" / "metrics.csv").write_text(text)
        curves.plot_training_curves(run, run / "curves.png")
        return {ax.get_title(): {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
                for ax in figures[-1].axes}

    return draw


def test_the_teacher_temperature_has_its_own_axis(drawn):
    panels = drawn(DINO_CSV)
    temperature = [t for t, lines in panels.items() if "train/teacher_temperature" in lines]
    momentum = [t for t, lines in panels.items() if "train/teacher_momentum" in lines]
    assert len(temperature) == len(momentum) == 1 and temperature != momentum
    assert panels[temperature[0]]["train/teacher_temperature"] == [0.04, 0.055, 0.07]
    assert list(panels[temperature[0]]) == ["train/teacher_temperature"]  # no 0-1 line beside it


def test_the_terms_panel_only_when_the_run_has_several_terms(drawn):
    dino = drawn(DINO_CSV)
    assert not any("train/loss_cls" in lines for lines in dino.values())  # it would repeat the loss
    v2 = drawn(DINOV2_CSV)
    terms = [lines for lines in v2.values() if "train/loss_cls" in lines]
    assert len(terms) == 1 and set(terms[0]) == {"train/loss_cls", "train/loss_patch", "train/loss_koleo"}
    assert terms[0]["train/loss_koleo"] == [-0.5, -0.5]
