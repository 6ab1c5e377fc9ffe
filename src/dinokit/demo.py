"""``dinokit demo``: pretrain the demo preset, then show what it learned.

Trains on the small real dataset (Fashion-MNIST, else digits), then prints the k-NN and
linear-probe accuracy of the trained teacher next to the same backbone at random initialisation
and raw pixels, and draws attention maps, PCA maps and the segmentation probe on the scene task
(ViTs: backbones with patch features), a t-SNE plot and the training curves into the run directory.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dinokit import atomic
from dinokit.config import Config, load_config
from dinokit.data.scenes import SCENES, scene_dataset
from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_evaluate
from dinokit.eval.linear import linear_probe
from dinokit.eval.segmentation import DenseView, extract_patch_features, predict_masks, segmentation_probe
from dinokit.train.build import build_dataset, build_method, build_preprocessing
from dinokit.train.fit import fit
from dinokit.viz.attention import cls_attention_maps, plot_attention
from dinokit.viz.curves import read_metrics
from dinokit.viz.embedding import plot_embedding_2d
from dinokit.viz.pca import pca_patch_maps, plot_pca
from dinokit.viz.segmentation import plot_segmentation

#: The preset ``dinokit demo`` trains without ``--config``: DINO with a small CNN on a small real
#: dataset, sized to train in minutes on a laptop's CPU.
MAIN_JOB_PRESET = "demo_cnn"
#: The linear probe's learning-rate sweep (SGD on standardised features; the best sits near 1).
PROBE_LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class DemoReport:
    """k-NN and linear-probe top-1 (%) of each feature extractor, and the pictures written."""

    run_dir: Path
    knn: dict[str, float]
    k: int
    final_loss: float | None
    n_prototypes: int
    pictures: list[Path] = field(default_factory=list)
    linear: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"top-1 on the held-out split (k-NN: k={self.k}, weighted vote, T=0.07;",
                 "linear: SGD probe, learning rate picked on a fifth of the bank):"]
        width = max(len(n) for n in self.knn)
        lines.append(f"  {'':<{width}}  {'k-NN':>8}  {'linear':>8}")
        for name, acc in self.knn.items():
            lin = self.linear.get(name)
            lin_s = f"{lin:6.2f} %" if lin is not None else f"{'-':>8}"
            lines.append(f"  {name:<{width}}  {acc:6.2f} %  {lin_s}")
        if self.final_loss is not None:
            lines.append(
                f"final training loss {self.final_loss:.3f} (ln K = {math.log(self.n_prototypes):.3f}"
                " would mean uniform collapse)"
            )
        return "\n".join(lines)


def _final_loss(run_dir: Path) -> float | None:
    try:
        series = read_metrics(run_dir).get("train/loss", [])
    except (FileNotFoundError, ValueError):
        return None
    tail = [v for _, v in series[-10:]]
    return sum(tail) / len(tail) if tail else None


def linear_top1(f_bank: torch.Tensor, y_bank: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                *, epochs: int = 30, seed: int = 0) -> float:
    """Linear-probe top-1 (%): the learning rate is picked from :data:`PROBE_LRS` on the last fifth
    of the bank (a held-out part of the training split), then the probe is retrained on the whole
    bank and scored once on the test split."""
    order = torch.randperm(len(f_bank), generator=torch.Generator().manual_seed(seed))
    cut = len(order) * 4 // 5
    tr, va = order[:cut], order[cut:]
    pick = linear_probe(f_bank[tr], y_bank[tr], f_bank[va], y_bank[va], lrs=PROBE_LRS, epochs=epochs,
                        seed=seed, progress=False)
    return linear_probe(f_bank, y_bank, f_test, y_test, lrs=(pick.best_lr,), epochs=epochs, seed=seed,
                        progress=False).top1


def evaluate(cfg: Config, trained: torch.nn.Module, *, k: int = 20, bank_limit: int = 10000,
             test_limit: int = 2000, probe_epochs: int = 30) -> tuple[dict[str, float], dict[str, float]]:
    """k-NN and linear-probe top-1 (row name -> %) of the trained teacher, a randomly initialised
    twin and raw pixels, all in the run's one preprocessing; ``probe_epochs=0`` skips the probe."""
    tf = build_preprocessing(cfg).eval_transform()
    bank_cfg = copy.deepcopy(cfg)
    bank_cfg.data.limit = min(bank_limit, cfg.data.limit or bank_limit)
    bank = build_dataset(bank_cfg, "train", transform=tf)
    test_cfg = copy.deepcopy(cfg)
    test_cfg.data.val_limit = test_limit
    test = build_dataset(test_cfg, "val", transform=tf)
    bank_loader = DataLoader(bank, batch_size=256, num_workers=0)
    test_loader = DataLoader(test, batch_size=256, num_workers=0)

    torch.manual_seed(cfg.trainer.seed)
    random_init = build_method(cfg).eval()
    method = cfg.model.method.upper().replace("DINOV", "DINOv")
    features = {}
    rows = ((f"{method} teacher (trained)", trained), ("same backbone, random init", random_init))
    for name, model in rows:
        features[name] = (*extract_features(model, bank_loader, progress=False),
                          *extract_features(model, test_loader, progress=False))
    features["raw pixels"] = (*_pixels(bank_loader), *_pixels(test_loader))
    knn, linear = {}, {}
    for name, (f_tr, y_tr, f_te, y_te) in features.items():
        knn[name] = knn_evaluate(f_tr, y_tr, f_te, y_te, ks=(k,))[k]["top1"]
        if probe_epochs > 0:
            linear[name] = linear_top1(f_tr, y_tr, f_te, y_te, epochs=probe_epochs, seed=cfg.trainer.seed)
    return knn, linear


def evaluate_knn(cfg: Config, trained: torch.nn.Module, *, k: int = 20,
                 bank_limit: int = 10000, test_limit: int = 2000) -> dict[str, float]:
    """k-NN top-1 of the trained teacher, a randomly initialised twin, and raw pixels."""
    return evaluate(cfg, trained, k=k, bank_limit=bank_limit, test_limit=test_limit, probe_epochs=0)[0]


def _pixels(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.flatten(1))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def draw_pictures(cfg: Config, method: torch.nn.Module, run_dir: Path, n_images: int = 6) -> list[Path]:
    """Attention maps, PCA maps, the segmentation probe and a t-SNE plot of the trained teacher."""
    out = run_dir / "pictures"
    out.mkdir(parents=True, exist_ok=True)
    prep = build_preprocessing(cfg)
    tf = prep.eval_transform()
    test_cfg = copy.deepcopy(cfg)
    test_cfg.data.val_limit = 1000
    test = build_dataset(test_cfg, "val", transform=tf)
    images = torch.stack([test[i][0] for i in range(n_images)])
    backbone = method.teacher_backbone.eval()
    written: list[Path] = []
    mean, std = tuple(prep.mean), tuple(prep.std)
    if backbone.supports_attention:
        maps = cls_attention_maps(backbone, images)
        for i in range(min(3, n_images)):
            written.append(plot_attention(images[i], maps[i], out / f"attention_{i}.png",
                                          threshold=0.6, mean=mean, std=std))
    with torch.no_grad():
        feats = backbone(images)
    if feats.patches is not None and backbone.patch_size:
        grid = backbone.grid_size(images.shape[-2], images.shape[-1])
        maps = pca_patch_maps(feats.patches, grid)
        written.append(plot_pca(images, maps, out / "pca.png", mean=mean, std=std))
        written.append(draw_segmentation(backbone, prep, out / "segmentation.png", n_images=n_images))
    f, y = extract_features(method, DataLoader(test, batch_size=256), progress=False)
    names = getattr(getattr(test, "dataset", test), "classes", None)
    written.append(plot_embedding_2d(f, y, out / "tsne.png", method="tsne", class_names=names))
    curves = out / "curves.png"
    if curves.is_file():
        written.append(curves)
    return written


def draw_segmentation(backbone: torch.nn.Module, prep: Any, path: Path, *, n_images: int = 6,
                      n_train: int = 300, epochs: int = 10) -> Path:
    """The linear segmentation probe (:mod:`dinokit.eval.segmentation`) trained on ``n_train``
    scenes of the built-in dense task and drawn on held-out ones: image / mask / prediction."""
    patch = backbone.patch_size
    view = DenseView.for_preprocessing(prep, -(-SCENES.canvas // patch) * patch)
    train = scene_dataset("scenes", "train", view, n_train, target="mask")
    test = scene_dataset("scenes", "test", view, n_images, target="mask")
    f_tr, m_tr = extract_patch_features(backbone, train, progress=False)
    f_te, m_te = extract_patch_features(backbone, test, progress=False)
    res = segmentation_probe(f_tr, m_tr, f_te, m_te, len(train.classes), epochs=epochs, progress=False)
    assert res.head is not None
    preds = predict_masks(res.head, f_te, [tuple(m.shape) for m in m_te])
    images = torch.stack([test[i][0] for i in range(n_images)])
    title = f"linear segmentation probe on held-out scenes (mIoU {res.miou:.1f} on these {n_images})"
    return plot_segmentation(images, m_te, preds, path, len(train.classes), mean=view.mean, std=view.std,
                             title=title)


def run_demo(overrides: list[str] | None = None, config: str | None = None, *,
             probe_epochs: int = 30) -> DemoReport:
    """Train the demo preset (or ``config``) and report; ``overrides`` are ``key=value`` strings."""
    cfg = load_config(config or MAIN_JOB_PRESET, overrides)
    result = fit(cfg)
    method = result.method.cpu().eval()
    knn, linear = evaluate(cfg, method, probe_epochs=probe_epochs)
    pictures = draw_pictures(cfg, method, result.run_dir)
    report = DemoReport(result.run_dir, knn, 20, _final_loss(result.run_dir),
                        cfg.dino.n_prototypes, pictures, linear)
    summary = {"k": 20, "top1": knn, "linear_top1": linear, "final_loss": report.final_loss}
    atomic.write_text(result.run_dir / "eval" / "demo_knn.json", json.dumps(summary, indent=2))
    return report
