"""Data-parallel training on several GPUs (or CPU processes) with PyTorch's DDP, launched by ``torchrun``.

``train`` calls :func:`setup` first. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) that
joins the process group, with NCCL on CUDA and gloo on the CPU, and ``train`` then wraps the model in
``DistributedDataParallel``. Every process draws the same global batch; each takes its own contiguous
slice of it (:func:`shard`), and its loss is scaled by its share of the batch so that DDP's average
of the gradients is the gradient of the global batch's mean loss: the same update as one process
with the whole batch, whatever the batch size. Without ``torchrun`` nothing here does anything.

Evaluation is split the same way: :func:`split_work` gives each process its slice of the test
examples (predictions, attacks, certificates) and hands every process the whole result, so a
notebook run under ``torchrun`` evaluates each example once, not once per process.

What does not split this way: losses that couple the samples of a batch (ARMOR_D's log-mean-exp
dual, DRSL's ``batch_sum`` form) and BatchNorm see each process's slice, not the global batch.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn


def setup() -> bool:
    """Join the process group when launched by torchrun with several processes; True when distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    atexit.register(_leave)
    return True


def _leave() -> None:
    """Leave the process group at exit (a gloo group left open can abort the process as it ends)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes checkpoints, files and progress bars."""
    return rank() == 0


def local_device() -> torch.device | None:
    """This process's GPU under torchrun (``cuda:LOCAL_RANK``), else None (let the caller choose)."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return None


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This process's contiguous slice of a global batch, and the factor its mean loss is scaled by.

    The factor is ``world_size * len(slice) / len(batch)``: DDP averages the processes' gradients, so
    scaled slices average to the gradient of the whole batch's mean even when the slices are unequal.
    """
    w = world_size()
    if w == 1:
        return x, y, 1.0
    if len(y) < w:
        raise ValueError(f"a batch of {len(y)} cannot be split over {w} processes; use batches of at least {w}")
    xs, ys = torch.tensor_split(x, w)[rank()], torch.tensor_split(y, w)[rank()]
    return xs, ys, w * len(ys) / len(y)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel when distributed, else the model itself."""
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_gradients(params) -> None:
    """Average the gradients of parameters outside the DDP model (a loss's own, like ARMOR_D's lambda)."""
    w = world_size()
    if w == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= w


def _concat(parts: list):
    """The processes' results in rank order: tensors concatenated, tuples element by element (None: no examples)."""
    parts = [p for p in parts if p is not None]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)


def _to_cpu(result):
    """A result (a tensor or a tuple of them) on the CPU, to travel between processes."""
    if isinstance(result, tuple):
        return tuple(t.cpu() for t in result)
    return None if result is None else result.cpu()


def split_work(fn, *tensors: torch.Tensor):
    """``fn(*tensors)``, its examples (the first dimension) split over the torchrun processes.

    Each process runs ``fn`` on its contiguous slice, and every process gets the whole result (a
    tensor, or a tuple of tensors, concatenated in order on the CPU). Without torchrun it is just
    ``fn(*tensors)``. Random draws then differ from a one-process run: each process draws its own.
    """
    if not setup():
        return fn(*tensors)
    w = world_size()
    mine = [torch.tensor_split(t, w)[rank()] for t in tensors]
    part = _to_cpu(fn(*mine)) if len(mine[0]) else None
    parts = [None] * w
    dist.all_gather_object(parts, part)
    if all(p is None for p in parts):
        raise ValueError("split_work got no examples: every input had length 0")
    return _concat(parts)
