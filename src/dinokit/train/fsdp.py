"""``trainer.strategy=fsdp``: FSDP2 for the student/teacher pair, through Lightning.

Lightning's ``ModelParallelStrategy`` runs FSDP2 (``fully_shard``, applied to the student and the
teacher in :meth:`~dinokit.train.module.DINOModule.configure_model`) on a 1-D data-parallel mesh,
with checkpoints gathered to full tensors. This subclass keeps one checkpoint layout for every
strategy: the optimiser state is keyed as ``torch.optim.Optimizer.state_dict()`` keys it (the
position of each parameter in the optimiser's groups), so a checkpoint written by a DDP or
1-process run resumes sharded and a sharded one resumes in one process, at any world size.
(Lightning keys it by the module's parameter order, which differs when the optimiser has
several groups: decay, no decay, the last layer.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinokit.weights import left_out_prefixes


def _raw(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)


def _param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The fully qualified name of each optimiser parameter, in the optimiser's order."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def to_index_keys(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimiser state dict (``torch.distributed.checkpoint``) -> torch's layout."""
    ids: dict[str, int] = {}
    groups = []
    for g in state["param_groups"]:
        params = []
        for name in g["params"]:
            ids[name] = len(ids)
            params.append(ids[name])
        groups.append({**g, "params": params})
    return {"state": {ids[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def to_name_keys(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's index-keyed optimiser state -> name-keyed, ``names`` in the optimiser's order."""
    n = sum(len(g["params"]) for g in state["param_groups"])
    if n != len(names):
        raise ValueError(f"the checkpoint's optimiser has {n} parameters, this model's has {len(names)}")
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with one checkpoint layout for every world size and strategy."""

    def __init__(self, world_size: int, **kwargs: Any):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=False, **kwargs)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        assert self.model is not None
        state = get_optimizer_state_dict(self.model, _raw(optimizer),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return to_index_keys(state) if state else state  # empty on processes other than the first

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.model is not None and self.lightning_module is not None
        path = Path(self.broadcast(str(checkpoint_path)))
        checkpoint = torch.load(path, map_location="cpu", mmap=True,
                                weights_only=True if weights_only is None else weights_only)
        # networks the checkpoint left out (a distillation's frozen teacher, checked by its
        # fingerprint in on_load_checkpoint) keep the weights this run rebuilt: loaded non-strictly,
        # then every other key is required as a strict load requires it
        left_out = left_out_prefixes(checkpoint)
        strict = self.lightning_module.strict_loading
        options = StateDictOptions(full_state_dict=True, strict=strict and not left_out)
        result = set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        if strict and left_out:
            missing = [k for k in result.missing_keys
                       if not k.startswith(left_out) and "_extra_state" not in k]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"{path}: the checkpoint does not fit the model: missing {missing[:8]}, "
                                   f"unexpected {list(result.unexpected_keys)[:8]}")
        for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states", []), strict=False):
            raw = _raw(optimizer)
            named = to_name_keys(state, _param_names(self.model, raw))
            set_optimizer_state_dict(self.model, raw, named, options=StateDictOptions(full_state_dict=True))
        return checkpoint
