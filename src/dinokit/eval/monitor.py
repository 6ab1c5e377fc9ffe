"""Online k-NN monitor: a Lightning callback that measures the teacher's k-NN accuracy on a
labelled validation set every N epochs and logs ``val/knn_top1`` / ``val/knn_top5``.

With several processes each does only its share (:mod:`dinokit.eval.features`): it extracts its
part of the bank and of the validation set, the bank is gathered on every process, each process
votes for its validation samples on its device, and the correct counts are summed: the accuracy is
that of one process over everything, at ``1 / world`` of the cost per process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from dinokit.distributed import all_reduce_sum
from dinokit.eval.features import extract_features_sharded, extract_share
from dinokit.eval.knn import knn_correct


def _dataset_of(source: Any) -> tuple[Any, int, int]:
    """``(dataset, batch_size, num_workers)`` of a DataLoader, or of a dataset (256, 0)."""
    if isinstance(source, torch.utils.data.DataLoader):
        return source.dataset, int(source.batch_size or 256), source.num_workers
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return source, 256, 0
    raise TypeError(f"KNNMonitor needs a dataset or a DataLoader over one, got {type(source).__name__}")


class KNNMonitor(pl.Callback):
    """Args: a labelled feature-bank dataset (or DataLoader over one), a labelled validation
    dataset (or DataLoader), the interval, the ks (the first is logged), the vote temperature and
    the feature kind. ``history`` keeps ``(epoch, top1)`` (the same on every process)."""

    def __init__(self, train_loader: Iterable[Any], val_loader: Iterable[Any], every_n_epochs: int = 1,
                 ks: Sequence[int] = (20,), temperature: float = 0.07, kind: str = "cls"):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.train_data, self.val_data = _dataset_of(train_loader), _dataset_of(val_loader)
        self.every_n_epochs, self.ks = every_n_epochs, tuple(ks)
        self.temperature, self.kind = temperature, kind
        self.history: list[tuple[int, float]] = []

    def evaluate(self, backbone: torch.nn.Module) -> dict[str, float | None]:
        """k-NN top-1/top-5 (%) for ``ks[0]`` over the whole validation set (a collective when
        distributed: every process must call it)."""
        device = next(backbone.parameters()).device
        feats = []
        for dataset, batch_size, workers in (self.train_data, self.val_data):
            # the bank is gathered on every process; the validation features stay local
            gather = dataset is self.train_data[0]
            feats.append(self._extract(backbone, dataset, batch_size, workers, device, gather))
        (f_tr, y_tr), (f_va, y_va) = feats
        if y_va is None:
            raise ValueError("the k-NN monitor needs labelled validation images")
        counts = knn_correct(f_tr, y_tr, f_va, y_va, ks=self.ks, temperature=self.temperature,
                             device=device)[self.ks[0]]
        top1, top5, n = all_reduce_sum(counts).tolist()
        return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n if top5 >= 0 else None}

    def _extract(self, backbone: Any, dataset: Any, batch_size: int, workers: int, device: Any,
                 gather: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if gather:
            return extract_features_sharded(backbone, dataset, batch_size=batch_size, num_workers=workers,
                                            kind=self.kind, out_device=None)
        f, y = extract_share(backbone, dataset, batch_size=batch_size, num_workers=workers, kind=self.kind,
                             out_device=None)
        return f, (y if y is not None else torch.full((len(f),), -1, dtype=torch.long, device=f.device))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs:
            return
        res = self.evaluate(pl_module.method.deployed_backbone)
        # identical on every process (the counts were summed): no further reduction when logging
        pl_module.log("val/knn_top1", res["top1"], on_epoch=True, prog_bar=True)
        if res["top5"] is not None:
            pl_module.log("val/knn_top5", res["top5"], on_epoch=True)
        self.history.append((epoch, float(res["top1"])))
