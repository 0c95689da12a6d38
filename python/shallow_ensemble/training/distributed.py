r"""Data-parallel training over several processes with ``torch.distributed``.

Launch the usual command under ``torchrun`` (one process per CPU socket or GPU)::

    torchrun --standalone --nproc-per-node 2 \
        -m shallow_ensemble.cli train config.yaml -o run

Every process reads the data and builds the same model (same seed; the parameters
are then broadcast from rank 0). Each step, the *global* batch of
``training.batch_size`` structures is split over the processes; each process weights
its energy and force losses by its share of the batch's structures and atoms, so
that the all-reduced gradient is the gradient of the same global-batch loss a single
process computes. The result therefore equals a one-process run with the same
global batch, up to floating-point summation order.

Gradients are summed with one ``all_reduce`` per step instead of through
``torch.nn.parallel.DistributedDataParallel``: the force losses differentiate
through gradients (double backward), which ``DistributedDataParallel``'s reducer
does not support, and the model is called through ``predict`` rather than
``forward``.

The backend is ``gloo`` on CPU and ``nccl`` on CUDA, where each process uses the GPU
of its ``LOCAL_RANK``. Only rank 0 writes files.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist


T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """This process's place among the training processes (one process by default).

    :param rank: index of this process
    :param world_size: number of processes
    :param device: device of the tensors this process reduces (``cuda`` for nccl)
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's part of ``items``: every ``world_size``-th, from ``rank``."""
        return list(items[self.rank :: self.world_size])

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the processes (the same result on every rank)."""
        if not self.distributed:
            return tensor
        reduced = tensor.detach().to(self.device).clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(tensor.device)

    def all_gather(self, value: Any) -> list[Any]:
        """``value`` of every process (picklable objects), in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                synced = tensor.detach().to(self.device).clone()
                dist.broadcast(synced, src=0)
                tensor.copy_(synced.to(tensor.device))

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``parameters`` over the processes, in one message.

        Missing gradients (a process with no structure in this batch, a parameter
        that does not enter the loss) count as zeros.
        """
        if not self.distributed:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
        flat = self.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for parameter, grad in zip(parameters, grads, strict=True):
            size = grad.numel()
            parameter.grad = flat[offset : offset + size].view_as(grad).clone()
            offset += size


def init_workers(device: torch.device) -> Workers:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), if any.

    Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) this is one process.
    Calling it again in the same process reuses the group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Workers(device=device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Workers(dist.get_rank(), dist.get_world_size(), device)
