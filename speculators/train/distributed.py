"""Process group and FSDP2 for the trainer; the model itself knows nothing of torchrun.

One process without torchrun runs without a process group; under torchrun every rank joins
one (NCCL on CUDA, gloo on CPU) and `parallelize` shards the draft with `fully_shard`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init() -> DistEnv:
    """Join torchrun's process group when launched by it; a plain process stays alone."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistEnv(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2: shard each decoder layer, then the root (fc, norms, heads, embeddings).

    On CUDA the sharded fp32 parameters are gathered as bf16 for compute while gradients are
    reduced in fp32 (the fp32 shards stay the master weights the optimizer updates); on CPU
    (gloo) everything stays fp32. A single rank needs no sharding.
    """
    if env.world_size == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if env.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks (a new tensor on t's device); the identity on one process.

    NCCL reduces only GPU tensors, so CPU tensors make a round trip through the device.
    """
    if not (env.distributed and env.world_size > 1):
        return t
    out = t.to(env.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def barrier(env: DistEnv) -> None:
    if env.distributed and env.world_size > 1:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not (env.distributed and env.world_size > 1):
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
