"""Process groups and model wrapping for `torchrun`: DDP by default, FSDP2 (`fully_shard`) on request.

`torchrun --nproc-per-node N -m m3ae pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous address); `init_distributed` reads them, picks gloo on CPU or nccl on CUDA and the
device cuda:LOCAL_RANK. Without those variables everything stays a single plain process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, cast

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r} ({err})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build or machine has no CUDA")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE set), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # device_id binds NCCL to this GPU eagerly (no lazy guessing of the device on first use).
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False) -> nn.Module:
    """DDP (static graph of used parameters, no find_unused_parameters) or FSDP2 per block.

    FSDP2 shards each encoder/decoder block, then the root (embeddings, heads, norms), in place:
    the returned module is `model` itself, so build the optimizer after this call.
    """
    if fsdp:
        if not info.enabled:
            raise ValueError("FSDP needs a process group: launch with torchrun")
        from torch.distributed.fsdp import fully_shard
        m3ae: Any = model  # the M3AE model: its block lists are named, not part of nn.Module
        for block in [*m3ae.encoder.blocks, *m3ae.decoder.blocks]:
            fully_shard(block)
        fully_shard(model)
        return model
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [info.device.index] if info.device.type == "cuda" else None
    # Our buffers are fixed position tables: no need to re-broadcast them every forward.
    import inspect
    sync: dict[str, Any] = ({"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **sync)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Wrap forward + backward: all-reduce only when `enabled` (the last backward of a step)."""
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
    no_sync = getattr(model, "no_sync", None)  # DDP
    if callable(set_sync):
        set_sync(enabled)
        yield
    elif callable(no_sync) and not enabled:
        with no_sync():
            yield
    else:
        yield


def unused_parameter_guard(model: nn.Module, part: Any) -> torch.Tensor | float:
    """0 x (one element of every parameter), added to the loss of a part that lacks a modality.

    DDP without find_unused_parameters waits for a gradient of every parameter in a syncing
    backward; an image-only or text-only part leaves the other modality's parameters out. This
    puts each one in the graph with a zero gradient at the cost of a few scalar ops.
    """
    if getattr(part, "image", None) is not None and getattr(part, "text", None) is not None:
        return 0.0
    return sum(p.reshape(-1)[0] for p in model.parameters() if p.requires_grad) * 0.0


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging); identity in one process."""
    if not info.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimiser state (collective under FSDP; rank 0 gets the full tensors).

    The optimiser state comes back in torch's usual integer-keyed layout, so checkpoints written
    by any number of processes (or FSDP) load in one process and vice versa.
    """
    if not fsdp:
        return _unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    named = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full_model_state(model, fsdp), _to_indexed(named)


def full_model_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """Unsharded model state. Under FSDP a collective (every rank calls it) that leaves the full
    tensors, on the CPU, on rank 0 only (other ranks get an empty dict)."""
    if not fsdp:
        return _unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast(dict[str, torch.Tensor], state)  # full_state_dict: plain tensors, no DTensor shards


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         fsdp: bool) -> None:
    """Load an integer-keyed (full) optimiser state into a plain, DDP or FSDP2 optimiser."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, _to_named(state, optimizer, model),
                             options=StateDictOptions(full_state_dict=True))


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DDP keeps the model as .module
    return inner if isinstance(inner, nn.Module) else model


def _param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Parameter names in optimiser order (the order torch numbers them in state_dict())."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _to_indexed(named: dict[str, Any]) -> dict[str, Any]:
    if not named:  # ranks other than 0 get an empty dict back from the full-state gather
        return {}
    order = [n for group in named["param_groups"] for n in group["params"]]
    index = {n: i for i, n in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def _to_named(indexed: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    names = _param_names(optimizer, model)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in indexed["state"].items()}, "param_groups": groups}
