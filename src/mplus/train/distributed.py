"""Data-parallel training over torch.distributed: the same trainer, N processes, one global batch.

Launched by torchrun (docs/distributed.md), every process reads its place from the environment (RANK,
WORLD_SIZE, LOCAL_RANK). All processes draw the same seeded stream of examples; a step's global batch of B
examples is cut into WORLD_SIZE contiguous shards and each process computes only its own shard's losses,
scaled by 1 / B. Summing the gradients over processes then gives the gradient of the global batch's mean
loss, the same as one process computing all B examples (up to float32 summation order), so a run's result
does not depend on how many processes share it. Every process then takes the same optimiser step on the same
weights and stays in step without ever broadcasting them.

Why a manual all-reduce after backward and not DistributedDataParallel: a memory step is not one call of one
module (stage 1 runs new_memory_block, then logits_with_rows, several times per step), DDP's hooks fire
per forward of the wrapped module, and which parameters receive a gradient depends on the example (a
fresh-block-only example never reads with the read adapter). One flat all-reduce per step, after all of a
shard's backward passes, is simpler and exact: a parameter no example of the global batch touched keeps
`grad = None` everywhere, as it would in one process, so AdamW skips it in both.

Backends: gloo for CPU tensors, nccl for CUDA tensors (each process on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """A torchrun environment or a batch that this trainer cannot run with."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the training processes; World() is a single process."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes checkpoints and shows progress."""
        return self.rank == 0


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The World torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK; World() when they are absent."""
    if "WORLD_SIZE" not in env:
        return World()
    try:
        world = World(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None
    if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
        raise DistributedError(f"invalid torchrun environment: RANK {world.rank}, WORLD_SIZE {world.size}, "
                               f"LOCAL_RANK {world.local_rank}; launch with torchrun")
    return world


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def start(device: torch.device = torch.device("cpu")) -> World:
    """This process's World, joining the process group first when torchrun started several processes
    (MASTER_ADDR / MASTER_PORT come from torchrun too). A group already started is reused."""
    world = world_from_env()
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.size)
        # Left to interpreter exit, gloo's teardown sometimes aborts a finished process ("terminate called
        # without an active exception", exit -6), and torchrun reports the run as failed.
        atexit.register(_leave)
    return world


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: int, world: World) -> range:
    """The indices of the global batch this process computes: its contiguous share of `batch`."""
    if batch < 1 or batch % world.size:
        raise DistributedError(f"the batch ({batch}) must be a positive multiple of the number of processes "
                               f"({world.size}); change batch or --nproc_per_node")
    per = batch // world.size
    return range(world.rank * per, (world.rank + 1) * per)


def sum_gradients(params: Sequence[torch.Tensor], world: World) -> None:
    """Sum every parameter's .grad over the processes, in place (one flat all-reduce). A parameter whose grad
    is None on every process stays None; one that some process left None counts as zero there."""
    if world.size == 1:
        return
    device = params[0].device
    used = torch.tensor([float(p.grad is not None) for p in params], device=device)  # [P]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(used)
    dist.all_reduce(flat)
    offset = 0
    for p, u in zip(params, used.tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if u else None
        offset += n


def gather(local: torch.Tensor, world: World) -> torch.Tensor:
    """Every process's local [b, ...] tensor, concatenated in rank order: [world.size * b, ...]."""
    if world.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def barrier(world: World) -> None:
    """Wait until every process reaches this point (a no-op for one process)."""
    if world.size > 1:
        dist.barrier()


def total(value: float, world: World) -> float:
    """The sum of a float over the processes (float64, so a reported loss does not depend on the order)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)
