"""Scale-out helpers for the student/teacher pair: SyncBatchNorm and FSDP2 sharding.

* **SyncBatchNorm.** The original DINO converts student *and* teacher to SyncBatchNorm under
  DDP (``main_dino.py``: ``nn.SyncBatchNorm.convert_sync_batchnorm`` for a CNN backbone), so the
  BatchNorm of a ResNet backbone or a BN head normalises over the global batch, not one GPU's
  share. :func:`prepare_for_strategy` does this before training whenever a run has more than one
  process and the model has BatchNorm (``trainer.sync_batchnorm``, on by default). torch's
  SyncBatchNorm runs on GPUs only: on a CPU run with several processes it is skipped with a warning.
* **FSDP2.** :func:`shard_method` applies ``torch.distributed.fsdp.fully_shard`` to the student
  and the teacher on *one* device mesh (each transformer block, then each whole network), so every
  teacher parameter is sharded exactly like its student twin: the EMA then runs shard by shard on
  the local tensors (:class:`~dinokit.ema.EMAUpdater` pairs by name each step). DINO's per-parameter
  clipping needs each parameter's *full* gradient norm: :func:`clip_per_parameter_sharded_` sums
  the squared local shards and reduces them in one collective (DINOv2/v3's per-module
  ``clip_grad_norm_`` handles DTensor gradients itself). :func:`full_state_dict` and
  :func:`full_optimizer_state_dict` gather a sharded method and its optimiser into plain tensors,
  and :func:`load_full_state_dict` / :func:`load_full_optimizer_state_dict` cut them again: a
  checkpoint taken at one world size resumes at another (tests/test_fsdp.py: 2 CPU processes on
  gloo equal 1 process, for DINO and DINOv2, and resume 2 -> 1 and 1 -> 2).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh

from dinokit.train.optim import local_shard

try:  # FSDP2's public API (torch >= 2.6); older torch runs everything but the sharding
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch
    fully_shard = DTensor = distribute_tensor = None

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` contains a BatchNorm layer (any dimensionality, SyncBatchNorm included)."""
    return any(isinstance(m, _BN_TYPES) for m in module.modules())


def _networks(method: nn.Module) -> list[tuple[str, Any]]:
    """``("student", net)`` for each network the optimiser trains (every student of a
    distillation), then ``("teacher", method.teacher)``."""
    if hasattr(method, "trained_networks"):
        students = [("student", net) for net, _ in method.trained_networks().values()]
    else:
        students = [("student", getattr(method, "student", None))]
    return [*students, ("teacher", getattr(method, "teacher", None))]


def convert_sync_batchnorm(method: nn.Module, process_group: Any = None) -> int:
    """Replace every BatchNorm of ``method.student`` and ``method.teacher`` (``ModuleDict``\\ s) by
    SyncBatchNorm, in place, keeping parameters, running statistics and their pairing for the EMA.
    Returns the number of layers converted."""
    count = 0
    for name, pair in _networks(method):
        if not isinstance(pair, nn.ModuleDict):
            raise TypeError(f"method.{name} must be an nn.ModuleDict (a SelfDistillationMethod), "
                            f"got {type(pair).__name__}")
        for key in list(pair.keys()):
            before = sum(isinstance(m, _BN_TYPES) and not isinstance(m, nn.SyncBatchNorm)
                         for m in pair[key].modules())
            if before:
                pair[key] = nn.SyncBatchNorm.convert_sync_batchnorm(pair[key], process_group)
                count += before
    return count


def prepare_for_strategy(method: nn.Module, trainer: Any, sync_batchnorm: bool = True) -> bool:
    """Make ``method`` ready for ``trainer``'s world before ``fit``: SyncBatchNorm for student and
    teacher when there is more than one process, the model has BatchNorm and ``sync_batchnorm``
    is on (it needs a GPU). Returns whether BatchNorm layers were converted."""
    world = int(getattr(trainer, "world_size", 1))
    if not sync_batchnorm or world <= 1 or not has_batchnorm(method):
        return False
    accelerator = type(getattr(trainer, "accelerator", None)).__name__.lower()
    if "cpu" in accelerator:
        warnings.warn(f"SyncBatchNorm needs GPUs: with {world} CPU processes each BatchNorm "
                      f"normalises over its own process's batch (trainer.sync_batchnorm=false "
                      f"silences this)", stacklevel=2)
        return False
    convert_sync_batchnorm(method)
    return True


# ------------------------------------------------------------------------------------ FSDP2
def _blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a backbone (``blocks`` of a timm ViT), if any."""
    found: list[nn.Module] = []
    for m in module.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            found.extend(blocks)
            break
    return found


def device_mesh(device_type: str | None = None) -> Any:
    """A 1-D mesh over all processes (``cuda`` when available, else ``cpu``)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs a process group: launch with torchrun / srun, or "
                           "torch.distributed.init_process_group first")
    kind = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(kind, (dist.get_world_size(),))


def shard_method(method: nn.Module, mesh: Any = None, **fsdp_kwargs: Any) -> Any:
    """``fully_shard`` each block and each network of ``method.student`` and ``method.teacher`` on
    one mesh (the same structure, so twin parameters get identical shards). Returns the mesh.

    The teacher is sharded without gradients and only ever runs forward, so it reshards after
    every forward, its outermost modules too (``reshard_after_forward=True``; FSDP2's default
    keeps a root module's parameters gathered until the backward pass, which the teacher never
    has: its EMA update would then write to a gathered copy that is thrown away). Its EMA update
    reads the local shards of both networks. Call before building the optimiser.
    """
    if fully_shard is None:  # pragma: no cover - older torch
        raise RuntimeError(f"FSDP2 sharding needs torch >= 2.6 (fully_shard), not {torch.__version__}")
    mesh = mesh if mesh is not None else device_mesh()
    for name, pair in _networks(method):
        kwargs = {**fsdp_kwargs, "reshard_after_forward": True} if name == "teacher" else fsdp_kwargs
        for key in list(pair.keys()):
            for block in _blocks(pair[key]):
                fully_shard(block, mesh=mesh, **kwargs)
            fully_shard(pair[key], mesh=mesh, **kwargs)
    return mesh




@torch.no_grad()
def clip_per_parameter_sharded_(params: Iterable[Tensor], max_norm: float) -> Tensor | None:
    """DINO's per-parameter clipping (each parameter's gradient rescaled to norm <= ``max_norm``,
    coefficient ``max_norm / (norm + 1e-6)``) on FSDP2-sharded gradients: the squared norms of the
    local shards are summed over the processes in one all-reduce. Plain tensors work too (no
    collective then). Returns the full per-parameter norms (a 1-D tensor) or None."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return None
    local = [local_shard(g) for g in grads]
    sharded = any(g is not loc for g, loc in zip(grads, local))
    sq = torch.stack([loc.float().pow(2).sum() for loc in local])
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq)
    norms = sq.sqrt()
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, list(scales.to(local[0].dtype).unbind()))
    return norms


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Plain (unsharded) tensors of ``module``'s state dict: sharded ones are gathered from all
    processes (a collective: call it on every process)."""
    out = {}
    for k, v in module.state_dict().items():
        full = getattr(v, "full_tensor", None)
        out[k] = full() if callable(full) else v
    return out


def _shard_like(ref: Any, src: Any) -> Any:
    """``src`` (a full tensor) cut as the DTensor ``ref`` is (every process holds ``src``: no
    communication); anything else as it is."""
    sharded = DTensor is not None and isinstance(ref, DTensor)
    if not sharded or not isinstance(src, Tensor) or isinstance(src, DTensor):
        return src
    if tuple(src.shape) != tuple(ref.shape):
        raise ValueError(f"full tensor of shape {tuple(src.shape)} for a parameter of shape "
                         f"{tuple(ref.shape)}")
    return distribute_tensor(src.to(device=ref.device, dtype=ref.dtype), ref.device_mesh,
                             ref.placements, src_data_rank=None)


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: dict[str, Any]) -> None:
    """Load plain tensors (what :func:`full_state_dict` gives) into a (possibly sharded)
    ``module``: each process keeps its shard, so a checkpoint written at one world size resumes at
    another. Non-tensor entries (a method's ``_extra_state``: step and epoch) load as usual."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"state dict lacks {missing[:5]}")
    module.load_state_dict({k: _shard_like(v, state[k]) for k, v in own.items()})


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name in ``module`` of each parameter of ``optimizer``, in its param_groups order."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError(f"the optimiser holds a parameter of shape {tuple(p.shape)} that is "
                                 f"not in the module (build the optimiser after shard_method)")
            out.append(names[id(p)])
    return out


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state keyed by parameter names in ``module``, with full (unsharded) tensors:
    it loads at any world size with :func:`load_full_optimizer_state_dict` (a collective when the
    parameters are sharded: call it on every process)."""
    names = _param_names(module, optimizer)
    sd = optimizer.state_dict()
    state = {}
    for i, st in sd["state"].items():
        state[names[i]] = {k: (v.full_tensor() if callable(getattr(v, "full_tensor", None)) else v)
                           for k, v in st.items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer,
                                   state: dict[str, Any]) -> None:
    """Load what :func:`full_optimizer_state_dict` wrote (at any world size) into ``optimizer``,
    whose parameters (sharded or not) belong to ``module``."""
    names = _param_names(module, optimizer)
    saved = [n for g in state["param_groups"] for n in g["params"]]
    if saved != names:
        diff = sorted(set(saved) ^ set(names))[:5]
        raise ValueError(f"optimiser state of other parameters (or another order), e.g. {diff}")
    params = dict(module.named_parameters())
    index = {n: i for i, n in enumerate(names)}
    per_param = {}
    for n, st in state["state"].items():
        ref = params[n]
        per_param[index[n]] = {k: _shard_like(ref, v) if getattr(v, "shape", None) == ref.shape else v
                               for k, v in st.items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


# ------------------------------------------------------------------------------- launchers
def launcher_world(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``(processes per node, nodes)`` set by ``torchrun`` (``LOCAL_WORLD_SIZE``, ``WORLD_SIZE``) or
    by ``srun`` (``SLURM_NTASKS``, ``SLURM_NNODES``), or None when not launched by either."""
    env = dict(os.environ) if env is None else env
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        return local, max(world // max(local, 1), 1)
    interactive = env.get("SLURM_JOB_NAME") in ("bash", "interactive")  # salloc shells: not srun tasks
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and not interactive:
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        per_node = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", ""))
        local = int(per_node.group()) if per_node else int(env["SLURM_NTASKS"]) // max(nodes, 1)
        return local, nodes
    return None


def with_launcher_env(cfg: Any, env: dict[str, str] | None = None) -> Any:
    """``cfg`` with ``trainer.devices`` / ``trainer.num_nodes`` taken from the launcher's environment
    when they are left at ``auto`` / 1 (so ``torchrun ... dinokit train`` and ``srun dinokit train``
    need no matching flags). Explicit values are kept (Lightning checks them against the world)."""
    found = launcher_world(env)
    t = cfg.trainer
    if found is None or (t.devices != "auto" and t.num_nodes != 1):
        return cfg
    local, nodes = found
    changes: dict[str, Any] = {}
    if t.devices == "auto":
        changes["devices"] = str(local)
    if t.num_nodes == 1 and nodes > 1:
        changes["num_nodes"] = nodes
    if not changes:
        return cfg
    return dataclasses.replace(cfg, trainer=dataclasses.replace(t, **changes))
