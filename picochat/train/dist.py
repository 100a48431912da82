"""Many processes: torchrun's process group (gloo on CPU, NCCL on CUDA), DDP replicas or FSDP2 shards, and
whole state dicts gathered from them for checkpoints. One process is the case where all of it is a no-op.

    torchrun --nproc_per_node=2 -m picochat.cli train ... --distributed ddp     # or fsdp (FSDP2)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model.gpt import GPT
from .config import TrainConfig


@dataclass
class DistInfo:
    """Where this process stands: its rank among world_size processes, its device, how it shards."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "single"               # "single" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(config: TrainConfig) -> DistInfo:
    """Join the torchrun process group if there is one (gloo on CPU, NCCL on CUDA); else one process."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch sees no CUDA GPU")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, config.distributed)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_model(model: GPT, info: DistInfo) -> nn.Module:
    """DDP replicas or FSDP2 shards (each block its own unit, then the whole model); as is for one process."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)  # modifies model in place: its parameters become sharded DTensors
    return model


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: GPT, info: DistInfo) -> dict:
    """The model's whole state dict (FSDP2: gathered onto rank 0, on CPU; other ranks get {}).
    Every rank must call it."""
    if info.mode != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_state_dict_options())


def optimizer_state(model: nn.Module, optimizers) -> dict:
    """The optimizers' state dict keyed by parameter name ({"state": {name: {"exp_avg": ...}}, "param_groups": [...]}),
    with whole tensors even under FSDP2 (on rank 0). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizers, options=_state_dict_options())


def load_optimizer_state(model: nn.Module, optimizers, osd: dict):
    """Load a state from optimizer_state into this run's optimizers (FSDP2: each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizers, osd, options=StateDictOptions(full_state_dict=True))
