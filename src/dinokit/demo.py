"""The main job of the README: pretrain the ``demo`` preset, then show that DINO learned.

Trains on the small real dataset (Fashion-MNIST, else digits), then prints the k-NN accuracy of
the trained teacher next to the same backbone at random initialisation and raw pixels, and
draws attention maps, PCA maps, a t-SNE plot and the training curves into the run directory.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dinokit.config import Config, load_config


@dataclass
class DemoReport:
    """k-NN top-1 (%) of each feature extractor and the pictures written."""

    run_dir: Path
    knn: dict[str, float]
    k: int
    final_loss: float | None
    n_prototypes: int
    pictures: list[Path] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"k-NN top-1 (k={self.k}, weighted vote, T=0.07) on the held-out split:"]
        width = max(len(n) for n in self.knn)
        for name, acc in self.knn.items():
            lines.append(f"  {name:<{width}}  {acc:6.2f} %")
        if self.final_loss is not None:
            lines.append(
                f"final training loss {self.final_loss:.3f} (ln K = {math.log(self.n_prototypes):.3f}"
                " would mean uniform collapse)"
            )
        return "\n".join(lines)


def _final_loss(run_dir: Path) -> float | None:
    from dinokit.viz.curves import read_metrics

    try:
        series = read_metrics(run_dir).get("train/loss", [])
    except (FileNotFoundError, ValueError):
        return None
    tail = [v for _, v in series[-10:]]
    return sum(tail) / len(tail) if tail else None


def evaluate_knn(cfg: Config, trained: torch.nn.Module, *, k: int = 20,
                 bank_limit: int = 10000, test_limit: int = 2000) -> dict[str, float]:
    """k-NN top-1 of the trained teacher, a randomly initialised twin, and raw pixels."""
    from dinokit.data import EvalTransform
    from dinokit.eval.features import extract_features
    from dinokit.eval.knn import knn_evaluate
    from dinokit.train.build import build_dataset, build_method, build_multicrop_config

    tf = EvalTransform.for_config(build_multicrop_config(cfg))
    bank_cfg = copy.deepcopy(cfg)
    bank_cfg.data.limit = min(bank_limit, cfg.data.limit or bank_limit)
    bank = build_dataset(bank_cfg, "train", transform=tf)
    test_cfg = copy.deepcopy(cfg)
    test_cfg.data.val_limit = test_limit
    test = build_dataset(test_cfg, "val", transform=tf)
    bank_loader = DataLoader(bank, batch_size=256, num_workers=0)
    test_loader = DataLoader(test, batch_size=256, num_workers=0)

    torch.manual_seed(cfg.trainer.seed)
    random_init = build_method(cfg)
    results: dict[str, float] = {}
    for name, model in (("DINO teacher (trained)", trained), ("same ViT, random init", random_init)):
        f_tr, y_tr = extract_features(model, bank_loader, progress=False)
        f_te, y_te = extract_features(model, test_loader, progress=False)
        results[name] = knn_evaluate(f_tr, y_tr, f_te, y_te, ks=(k,))[k]["top1"]
    x_tr, y_tr = _pixels(bank_loader)
    x_te, y_te = _pixels(test_loader)
    results["raw pixels"] = knn_evaluate(x_tr, y_tr, x_te, y_te, ks=(k,))[k]["top1"]
    return results


def _pixels(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.flatten(1))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def draw_pictures(cfg: Config, method: torch.nn.Module, run_dir: Path, n_images: int = 6) -> list[Path]:
    """Attention maps, PCA maps and a t-SNE plot of the trained teacher."""
    from dinokit.data import EvalTransform
    from dinokit.eval.features import extract_features
    from dinokit.train.build import build_dataset, build_multicrop_config
    from dinokit.viz.attention import cls_attention_maps, plot_attention
    from dinokit.viz.embedding import plot_embedding_2d
    from dinokit.viz.pca import pca_patch_maps, plot_pca

    out = run_dir / "pictures"
    out.mkdir(parents=True, exist_ok=True)
    mc = build_multicrop_config(cfg)
    tf = EvalTransform.for_config(mc)
    test_cfg = copy.deepcopy(cfg)
    test_cfg.data.val_limit = 1000
    test = build_dataset(test_cfg, "val", transform=tf)
    images = torch.stack([test[i][0] for i in range(n_images)])
    backbone = method.teacher_backbone.eval()
    written: list[Path] = []
    mean, std = tuple(mc.mean), tuple(mc.std)
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
    f, y = extract_features(method, DataLoader(test, batch_size=256), progress=False)
    names = getattr(getattr(test, "dataset", test), "classes", None)
    written.append(plot_embedding_2d(f, y, out / "tsne.png", method="tsne", class_names=names))
    curves = out / "curves.png"
    if curves.is_file():
        written.append(curves)
    return written


def run_demo(overrides: list[str] | None = None, config: str = "demo") -> DemoReport:
    """Train the demo preset and report; ``overrides`` are ``key=value`` strings."""
    from dinokit.train.fit import fit

    cfg = load_config(config, overrides)
    result = fit(cfg)
    method = result.method.cpu().eval()
    knn = evaluate_knn(cfg, method)
    pictures = draw_pictures(cfg, method, result.run_dir)
    report = DemoReport(result.run_dir, knn, 20, _final_loss(result.run_dir),
                        cfg.model.n_prototypes, pictures)
    eval_dir = result.run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    (eval_dir / "demo_knn.json").write_text(json.dumps({"k": 20, "top1": knn,
                                                        "final_loss": report.final_loss}, indent=2))
    return report
