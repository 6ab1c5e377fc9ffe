"""Shared by ``dinokit eval|viz|export``: load a backbone from a checkpoint, build eval data."""

from __future__ import annotations

import copy
import datetime
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dinokit.backbones import Backbone, BackboneError
from dinokit.config import ConfigError, from_dict, upgrade_saved
from dinokit.data import EvalTransform, load_demo_dataset
from dinokit.data.multiband import folder_dataset
from dinokit.data.preprocessing import Preprocessing
from dinokit.methods.registry import method_spec
from dinokit.weights import WeightsError

DEMO_NAMES = ("demo", "fashion-mnist", "digits")


@dataclass
class Loaded:
    """A backbone ready for evaluation, its eval transform, and the run directory (if any)."""

    backbone: Backbone
    transform: EvalTransform
    run_dir: Path | None


def add_checkpoint_arg(p: Any) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="run directory, training .ckpt, or exported .safetensors")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="which backbone of a training checkpoint (default: teacher)")
    add_student_arg(p)


def add_student_arg(p: Any) -> None:
    p.add_argument("--student", default=None, metavar="NAME",
                   help="a distillation run with several students (model.students): the student of this "
                        "name (default: the first)")


def which_of(args: Any) -> str:
    """``--which``, or ``student:NAME`` when ``--student NAME`` is given."""
    return f"student:{args.student}" if getattr(args, "student", None) else args.which


def load(checkpoint: str, which: str = "teacher") -> Loaded:
    """Backbone + eval transform from a run directory, a training checkpoint or an export."""
    src = Path(checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    timm_folder = src.is_dir() and (src / "model.safetensors").exists() and not (src / "checkpoints").exists()
    if src.suffix in (".safetensors", ".json") or timm_folder:
        from dinokit.export import load_backbone, read_metadata  # commands load their heavy parts when run

        meta = read_metadata(src)
        bb = load_backbone(src)
        return Loaded(bb, export_preprocessing(meta).eval_transform(), None)
    from dinokit.train.build import build_method, build_preprocessing  # Lightning: only when needed
    from dinokit.weights import backbone_state_dict, load_backbone_weights, read_file

    ckpt = src / "checkpoints" / "last.ckpt" if src.is_dir() else src
    obj = read_file(ckpt)
    config = upgrade_saved((obj.get("dinokit") or {}).get("config"))
    if not config:
        raise WeightsError(f"{ckpt} is not a dinokit training checkpoint (no run config inside)")
    cfg = from_dict(config)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    if which.startswith("student:") and method_spec(cfg.model.method).deploys != "student":
        raise ConfigError(f"--student {which.split(':', 1)[1]}: {ckpt} is a {cfg.model.method} run, not a "
                          "distillation with named students (use --which student)")
    if method_spec(cfg.model.method).deploys == "student":  # a distillation: its student, not its input
        from dinokit.embed import load_for_embedding  # commands load their heavy parts when run

        backbone, transform = load_for_embedding(ckpt, "student" if which == "teacher" else which)
        return Loaded(backbone, transform, run_dir)
    torch.manual_seed(0)
    # The weights come from the checkpoint: never re-read the run's start-up files (they may be gone).
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.init_weights = build_cfg.gram.teacher_path = None
    method = build_method(build_cfg)
    backbone = getattr(method, f"{which}_backbone")
    load_backbone_weights(backbone, backbone_state_dict(obj, which), source=str(ckpt))
    return Loaded(backbone.eval(), build_preprocessing(cfg).eval_transform(), run_dir)


def export_preprocessing(meta: dict[str, Any]) -> Preprocessing:
    """The preprocessing stored in an export's metadata (older exports: the preset for its size)."""
    if meta.get("preprocessing"):
        return Preprocessing.from_dict(meta["preprocessing"])
    size = int(meta.get("image_size") or 224)
    return Preprocessing.default_for(size, int(meta["timm_kwargs"].get("in_chans", 3)))


def dataset(spec: str, transform: Any, *, split: str, limit: int | None = None,
            need_labels: bool = False) -> Dataset:
    """``demo``/``fashion-mnist``/``digits`` (train or test split), an image folder or a folder of
    multi-band files (for a transform of other than 1 or 3 channels)."""
    if spec in DEMO_NAMES:
        return load_demo_dataset("auto" if spec == "demo" else spec, split=split, transform=transform,
                                 limit=limit)
    ds = folder_dataset(spec, transform, channels=getattr(transform, "channels", 3))
    if need_labels and not ds.classes:
        raise ConfigError(f"k-NN and linear evaluation need labelled data: {spec} has no class sub-folders")
    if limit:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    return ds


def keep_earlier(out: Path) -> Path | None:
    """Rename an earlier result file after the time it was written; returns its new path."""
    if not out.is_file():
        return None
    stamp = datetime.datetime.fromtimestamp(out.stat().st_mtime).strftime("%Y-%m-%dT%H-%M-%S")
    kept = out.with_name(f"{out.stem}.{stamp}{out.suffix}")
    n = 1
    while kept.exists():
        n += 1
        kept = out.with_name(f"{out.stem}.{stamp}-{n}{out.suffix}")
    out.rename(kept)
    return kept


def loader(ds: Dataset, batch_size: int = 256) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


# ------------------------------------------------------------------------ errors and exit codes
#: Exit codes of ``dinokit`` (documented in the README, "When things go wrong").
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected error: please report it (run again with --debug for the traceback)
EXIT_USER = 2  # a bad config, path, image or checkpoint: the message says which
EXIT_STOPPED = 3  # training stopped by a guard (collapse with trainer.stop_on_collapse, non-finite)
EXIT_IO = 74  # a checkpoint could not be written (disk full, ...): earlier ones are intact
EXIT_REQUEUE = 75  # pre-empted (SIGTERM/SIGUSR1) after checkpointing: resubmit, resume=auto
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); training checkpoints the last step first


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (a DataLoader worker's error carries its traceback text:
    keep its last line)."""
    text = str(e).strip() or type(e).__name__
    if "Original Traceback" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1]) if lines else text
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {e.strerror or text}"
    return " ".join(text.split("\n"))


def exit_code(e: BaseException) -> int:
    """The exit code for an exception reaching the command line.

    An exception may carry its own ``exit_code`` attribute (pre-emption, guards, write errors).
    """
    code = getattr(e, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, (ConfigError, WeightsError, BackboneError, OSError, EOFError, UnicodeError)):
        return EXIT_USER
    if isinstance(e, Image.DecompressionBombError):
        return EXIT_USER
    return EXIT_BUG


def run_guarded(command: str, func: Any, args: Any, debug: bool = False) -> int:
    """Run ``func(args)``; any error becomes one line on stderr and a non-zero exit code
    (``debug``: the traceback too)."""
    try:
        return int(func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        code = exit_code(e)
        if debug:
            traceback.print_exc()
        stop = code in (EXIT_REQUEUE, EXIT_INTERRUPTED)
        kind = "" if stop or code in (EXIT_USER, EXIT_STOPPED, EXIT_IO) else f"{type(e).__name__}: "
        hint = " (run with --debug for the traceback)" if code == EXIT_BUG and not debug else ""
        label = "stopped" if stop else "error"
        newest = getattr(e, "newest_checkpoint", False)
        where = "" if newest is False else f"; newest checkpoint with finite weights: {newest or 'none'}"
        print(f"dinokit {command}: {label}: {kind}{_one_line(e)}{where}{hint}", file=sys.stderr)
        return code
