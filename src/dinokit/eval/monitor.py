"""Online k-NN monitor: a Lightning callback that measures the teacher's k-NN accuracy on a
labelled validation set every N epochs and logs ``val/knn_top1`` / ``val/knn_top5``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl

from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_evaluate


class KNNMonitor(pl.Callback):
    """Args: a labelled feature-bank loader, a labelled validation loader, the interval, the ks
    (the first is logged), the vote temperature and the feature kind. Computed on every process
    (features are small); ``history`` keeps ``(epoch, top1)``."""

    def __init__(self, train_loader: Iterable[Any], val_loader: Iterable[Any], every_n_epochs: int = 1,
                 ks: Sequence[int] = (20,), temperature: float = 0.07, kind: str = "cls"):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.train_loader, self.val_loader = train_loader, val_loader
        self.every_n_epochs, self.ks = every_n_epochs, tuple(ks)
        self.temperature, self.kind = temperature, kind
        self.history: list[tuple[int, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs:
            return
        backbone = pl_module.method.teacher_backbone
        f_tr, y_tr = extract_features(backbone, self.train_loader, kind=self.kind, progress=False)
        f_va, y_va = extract_features(backbone, self.val_loader, kind=self.kind, progress=False)
        res = knn_evaluate(f_tr, y_tr, f_va, y_va, ks=self.ks, temperature=self.temperature)[self.ks[0]]
        pl_module.log("val/knn_top1", res["top1"], on_epoch=True, prog_bar=True)
        if res["top5"] is not None:
            pl_module.log("val/knn_top5", res["top5"], on_epoch=True)
        self.history.append((epoch, float(res["top1"])))
