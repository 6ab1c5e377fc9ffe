"""Training curves from a run directory's ``logs/metrics.csv`` (Lightning's CSVLogger)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure

from dinokit.viz._figure import new_figure, save

#: ``(title, metrics)`` of each panel, drawn when the run logged any of its metrics. The teacher
#: temperature (about 0.04) has its own panel: on the momentum's 0-1 axis it would read as zero.
PANELS = [
    ("loss", ["train/loss", "val/loss"]),
    ("k-NN top-1 (%)", ["val/knn_top1"]),
    ("teacher entropy (nats)", ["train/teacher_entropy"]),
    ("learning rate", ["train/lr"]),
    ("EMA momentum", ["train/teacher_momentum"]),
    ("teacher temperature", ["train/teacher_temperature"]),
]
#: The panel of the loss terms (``train/loss_<term>``), drawn when the run has more than one term:
#: with a single term (DINO's ``loss_cls``) it would repeat the loss panel.
TERMS_TITLE = "loss terms (unweighted)"
TERM_PREFIX = "train/loss_"


def _metrics_file(source: str | Path) -> Path:
    p = Path(source)
    if p.is_file():
        return p
    found = sorted(p.glob("logs/**/metrics.csv")) or sorted(p.glob("**/metrics.csv"))
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {p} (is it a dinokit run directory?)")
    return found[0]


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_metrics(source: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metric -> [(step, value), ...]`` from a run directory or a CSV path; empty cells skipped.

    A resumed run's earlier parts (``metrics.partNNN.csv``) come first; rows of a part at or after
    the first step of the next part (logged after the checkpoint, before a crash) are dropped."""
    last = _metrics_file(source)
    files = [*sorted(last.parent.glob("metrics.part*.csv")), last]
    parts = [_read_rows(f) for f in files]
    rows: list[dict[str, str]] = []
    for i, part in enumerate(parts):
        nxt = next((int(float(r["step"])) for p in parts[i + 1 :] for r in p[:1] if r.get("step")), None)
        rows += [r for r in part if nxt is None or int(float(r.get("step") or 0)) < nxt]
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = int(float(row.get("step") or 0))
        for key, value in row.items():
            if key in ("step", "epoch") or value in (None, ""):
                continue
            v = float(value)
            if math.isfinite(v):
                series.setdefault(key, []).append((step, v))
    return series


def curve_panels(series: dict[str, list[tuple[int, float]]]) -> list[tuple[str, list[str]]]:
    """``(title, metrics)`` of each panel worth drawing for ``series`` (what :func:`read_metrics`
    gives): the :data:`PANELS` with a logged metric, then the loss terms when there are several."""
    panels = [(title, [k for k in keys if k in series]) for title, keys in PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    terms = sorted(k for k in series if k.startswith(TERM_PREFIX))
    if len(terms) > 1:
        panels.append((TERMS_TITLE, terms))
    return panels


def training_curves_figure(source: str | Path, n_prototypes: int | None = None) -> Figure:
    """One panel per :func:`curve_panels` entry; a dashed line at ln K marks uniform collapse."""
    series = read_metrics(source)
    panels = curve_panels(series)
    if not panels:
        raise ValueError(f"no known metric in {_metrics_file(source)} (found {sorted(series)})")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(4.2 * cols, 3.0 * rows)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for k in keys:
            steps, values = zip(*series[k])
            ax.plot(steps, values, label=k, lw=1.2, marker="o" if len(values) < 20 else None)
        if n_prototypes and title in ("loss", "teacher entropy (nats)"):
            ax.axhline(math.log(n_prototypes), ls="--", c="grey", lw=1, label="ln K (uniform collapse)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training_curves(source: str | Path, path: str | Path, n_prototypes: int | None = None) -> Path:
    """:func:`training_curves_figure` of a run directory or CSV, saved to ``path``."""
    return save(training_curves_figure(source, n_prototypes), path)
