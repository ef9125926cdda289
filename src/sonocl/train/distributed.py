"""Distributed data parallel through ``torchrun`` (``env://`` rendezvous), and nothing at all without it.

A process group is created only when torchrun (or the user) sets ``WORLD_SIZE > 1``; the single-process
path never calls a collective. Gradients are averaged with one all-reduce per step after the backward pass
(no DDP wrapper, so the objectives can call the model, ``torch.func.functional_call`` included, unchanged),
and negatives are gathered across ranks with gradient (`gather_with_grad`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sonocl.runtime import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Read torchrun's environment; join the process group when there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    context = DistributedContext(rank, world_size, local_rank)
    if context.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method="env://",
            timeout=datetime.timedelta(minutes=30),
            device_id=device if device.type == "cuda" else None,
        )
    return context, device


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient for a slice back to the slice's owner (summed)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` ``(B, …)`` of every rank in rank order, ``(W·B, …)``; gradients flow back to each rank.

    Integer tensors (group ids, labels) are gathered without autograd.
    """
    if not tensor.is_floating_point():
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)
    return _GatherWithGrad.apply(tensor)


def make_gather(context: DistributedContext) -> Callable[[Tensor], Tensor] | None:
    """The gather callable the objectives get: None in a single process (so no collective can be called)."""
    return gather_with_grad if context.enabled else None


def average_gradients(parameters: Iterable[torch.nn.Parameter], context: DistributedContext) -> None:
    """Average the gradients over ranks with one flat all-reduce (a no-op in a single process)."""
    if not context.enabled:
        return
    grads = []
    for p in parameters:
        if not p.requires_grad:
            continue
        if p.grad is None:  # every rank must contribute the same flat layout
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_mean(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """The mean over ranks of each value (one all-reduce); a non-finite value on any rank reaches every rank."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / context.world_size).tolist()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()
