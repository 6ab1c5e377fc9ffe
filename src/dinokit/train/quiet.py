"""Keep Lightning's noise out of a run's output: its advertising tips, and warnings that do not
concern the user (a deprecation inside Lightning itself, notices about what dinokit sets up on
purpose). Real warnings (a NaN, a skipped image, a missing package) still get through."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

#: Lightning's messages that say nothing about the run (regular expressions for ``warnings``).
LIGHTNING_NOISE: tuple[str, ...] = (
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",  # inside Lightning, on recent torch
)

#: A module whose ``validation_step`` serves an optional validation loader, fitted without one.
NO_VAL_LOADER = ".*You defined a `validation_step` but have no `val_dataloader`.*"

#: Messages of ``dinokit train``'s own set-up, where every module is dinokit's: one loader worker on
#: small machines, steps skipped on purpose, a run directory that is resumed into, the k-NN
#: monitor's validation step without a validation loader, the frozen Gram teacher in eval mode,
#: and the code sample Lightning prints for step checkpoints under manual optimisation (a step
#: checkpoint holds the state after the step's update, which is what a resume needs).
FIT_NOISE: tuple[str, ...] = (
    ".*does not have many workers.*",
    ".*`training_step` returned `None`.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    NO_VAL_LOADER,
    ".*module\\(s\\) in eval mode at the start of training.*",  # DINOv3's frozen Gram teacher
    ".*Using ModelCheckpoint with manual optimization and every_n_train_steps.*",
)

#: Where Lightning logs from (``rank_zero_info``), and the parents that hold its stream handler.
_LOGGERS = tuple(f"{pkg}{sub}" for pkg in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                                          "lightning_fabric") for sub in ("", ".utilities.rank_zero"))


class _DropTips(logging.Filter):
    """Drops Lightning's product tips (``"💡 Tip: ... try installing litlogger ..."``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith("💡 Tip")


@contextlib.contextmanager
def quiet_lightning(messages: Sequence[str] = LIGHTNING_NOISE) -> Iterator[None]:
    """Within the block, drop Lightning's tips and the warnings matching ``messages``."""
    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    handlers = [h for lg in loggers for h in lg.handlers]
    for target in [*loggers, *handlers]:  # a logger's filter sees only its own records
        target.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for pattern in messages:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for target in [*loggers, *handlers]:
            target.removeFilter(tips)
