"""One training loop for every chapter, with pluggable losses, seeds, progress and resumable checkpoints.

A loss is any callable ``loss_fn(model, x, y) -> scalar``. If it is an ``nn.Module`` with parameters
of its own (a learned dual variable, say), the loop optimises them too and saves them in the
checkpoint: with the model's optimizer, or with Adam at ``loss_lr`` when that is given.

``fit`` names a checkpoint by a hash of everything that shapes the weights (the recipe, every
constructor argument of the loss and the model, the schedule) and returns a :class:`Training`:
the model, its loss and the record of the run. The baseline losses are in
:mod:`defenses_lib.defenses.baselines`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed, estimate
from .checks import check_choice, check_int
from .config import config
from .data import AUGMENTS, augment
from .models import build_model
from .runtime import atomic_write, count_flops, model_device, pick_device, progress, record, seed_everything, timeit

RUNS_ENV = "DEFENSES_RUNS"


def recipe_hash(recipe: dict) -> str:
    """A short stable hash of a JSON-able recipe, to name its checkpoint."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_dir(*parts: str) -> Path:
    """Where runs write checkpoints: $DEFENSES_RUNS, else ./runs; created if missing."""
    path = Path(os.environ.get(RUNS_ENV, "runs")).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


CHECKPOINT_MAGIC = b"defenses_lib checkpoint sha256="   # then the payload's hex digest and a newline


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: empty, truncated, corrupted or not this library's."""


def atomic_save(obj, path: str | os.PathLike) -> None:
    """Save ``obj`` (torch.save) with a SHA-256 digest of its bytes, atomically (see ``runtime.atomic_write``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()   # no copy of the bytes
    header = CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"

    def write(tmp):
        """The header, then the payload."""
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)

    atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike, device=None) -> dict:
    """Load a checkpoint safely (``weights_only=True``) after checking its digest; a damaged file is a
    :class:`CheckpointError` that names it and says how to recover."""
    path = Path(path)
    data = path.read_bytes()
    fix = f"delete it to train that model again (rm '{path}')"
    if data.startswith(CHECKPOINT_MAGIC):
        head, _, payload = data.partition(b"\n")
        if hashlib.sha256(payload).hexdigest().encode() != head[len(CHECKPOINT_MAGIC):]:
            raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the digest written "
                                  f"with them (a truncated or corrupted file); {fix}")
        source = io.BytesIO(payload)
    elif data.startswith(b"PK"):   # a torch zip file from before checkpoints carried a digest
        warnings.warn(f"checkpoint {path} carries no digest (an older format): loaded unchecked; {fix} with one",
                      stacklevel=2)
        source = io.BytesIO(data)
    else:
        what = "an empty file" if not data else f"{len(data)} bytes that are not a checkpoint of this library"
        raise CheckpointError(f"checkpoint {path} is {what}; {fix}")
    try:
        return torch.load(source, map_location=device or "cpu", weights_only=True)
    except Exception as e:   # a digest that matches but a payload torch cannot read (another library's file)
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); {fix}") from e


def _optimizer(params, name: str, lr: float, weight_decay: float, momentum: float):
    """SGD (with momentum) or Adam."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def _epoch_loader(dataset, batch_size: int, seed: int, epoch: int) -> DataLoader:
    """The epoch's batches, in an order drawn once from (seed, epoch): the same whatever iterates them."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=g).tolist()
    return DataLoader(dataset, batch_size=batch_size, sampler=order)


def _optimizers(model, loss_fn, optimizer, lr, weight_decay, momentum, loss_lr) -> list:
    """The model's optimizer (with the loss's parameters, unless they get their own Adam at ``loss_lr``)."""
    extra = _loss_parameters(loss_fn)
    own = list(model.parameters()) + (extra if loss_lr is None else [])
    opts = [_optimizer(own, optimizer, lr, weight_decay, momentum)]
    if extra and loss_lr is not None:
        opts.append(_optimizer(extra, "adam", loss_lr, 0.0, momentum))
    return opts


def _loss_parameters(loss_fn) -> list:
    """The loss's own trainable parameters (none for a plain function)."""
    return list(loss_fn.parameters()) if isinstance(loss_fn, nn.Module) else []


def _restore(state, model, loss_fn, opts, sched) -> tuple[int, list]:
    """Load a checkpoint's state into the run; returns (epochs done, history)."""
    model.load_state_dict(state["model"])
    for o, o_state in zip(opts, state["optimizer"]):
        o.load_state_dict(o_state)
    sched.load_state_dict(state["scheduler"])
    if isinstance(loss_fn, nn.Module):
        loss_fn.load_state_dict(state["loss"])
    torch.set_rng_state(state["rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])
    return state["epoch"], state["history"]


def _save(path, model, loss_fn, opts, sched, epoch: int, history: list) -> None:
    """Write the run's state after ``epoch`` epochs, atomically."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    atomic_save({"model": model.state_dict(), "optimizer": [o.state_dict() for o in opts],
                 "scheduler": sched.state_dict(),
                 "loss": loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {},
                 "rng": torch.get_rng_state(), "epoch": epoch, "history": history, "cuda_rng": cuda}, path)


def train(model: nn.Module, dataset, loss_fn, *, epochs: int, batch_size: int = 128, optimizer: str = "adam",
          lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9, milestones=(), gamma: float = 0.1,
          loss_lr: float | None = None, seed: int = 0, augment: str = "none",
          checkpoint: str | os.PathLike | None = None, device=None, desc: str = "train",
          show_progress: bool = True) -> list[dict]:
    """Train ``model`` on ``dataset`` with ``loss_fn`` and return the per-epoch history.

    With ``checkpoint``, the state is saved atomically after every epoch; a run started again with
    the same arguments resumes where it stopped and ends with the same weights as an uninterrupted
    run. A finished checkpoint is simply loaded. ``milestones`` are the epochs where lr is
    multiplied by ``gamma``. ``augment`` transforms each batch on the device (see ``data.augment``).
    A loss with a ``set_epoch(epoch)`` method (a schedule) is told each epoch first. Under
    ``torchrun`` the model trains in DistributedDataParallel, each process on its slice of every
    batch (see :mod:`defenses_lib.distributed`); only the first process writes.
    """
    check_int("epochs", epochs, minimum=0)
    check_int("batch_size", batch_size)
    check_choice("augment", augment, AUGMENTS)
    distributed.setup()
    device = device or distributed.local_device()
    device = pick_device(device) if not isinstance(device, torch.device) else device
    model.to(device)
    loss_fn = loss_fn.to(device) if isinstance(loss_fn, nn.Module) else loss_fn
    opts = _optimizers(model, loss_fn, optimizer, lr, weight_decay, momentum, loss_lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opts[0], list(milestones), gamma)
    seed_everything(seed)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        start, history = _restore(load_checkpoint(checkpoint, device), model, loss_fn, opts, sched)
    net = distributed.wrap(model, device)
    batches = math.ceil(len(dataset) / batch_size)
    for epoch in range(start, min(epochs, start + 1) if estimate.active() else epochs):
        if hasattr(loss_fn, "set_epoch"):  # losses with a schedule (an h or eps ramp) follow the epoch
            loss_fn.set_epoch(epoch)
        show = show_progress and distributed.is_main()
        run = estimate.cap(batches, estimate.TRAIN_BATCHES)   # all of them, except in estimate mode
        with estimate.stage("training", (epochs - start) * batches, run, data=True):
            history.append(_run_epoch(net, dataset, loss_fn, opts, batch_size, seed, epoch, device,
                                      f"{desc} {epoch + 1}/{epochs}", show, augment, run))
        sched.step()
        if checkpoint is not None and distributed.is_main() and not estimate.active():
            _save(checkpoint, model, loss_fn, opts, sched, epoch + 1, history)
    model.eval()
    return history


def _run_epoch(model, dataset, loss_fn, opts, batch_size, seed, epoch, device, desc, show_progress,
               augment_kind="none", max_batches=None) -> dict:
    """One pass over the data (this process's slice of each batch; its first ``max_batches`` batches
    when given): mean loss, examples seen, seconds."""
    model.train()
    total, seen, t0 = 0.0, 0, time.perf_counter()
    bar = progress(_epoch_loader(dataset, batch_size, seed, epoch), desc, enabled=show_progress)
    for i, (x, y) in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        x, y, share = distributed.shard(augment(x.to(device), augment_kind), y.to(device))
        loss = loss_fn(model, x, y)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        (loss * share).backward()
        distributed.average_gradients(_loss_parameters(loss_fn))
        for opt in opts:
            opt.step()
        total += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{total / seen:.3f}", refresh=False)
    return {"epoch": epoch + 1, "loss": total / max(seen, 1), "examples": seen,
            "seconds": time.perf_counter() - t0}


@dataclass
class Training:
    """One ``fit``: the trained model, the loss it was trained with and the run's record."""

    model: nn.Module
    loss: Callable
    record: dict   # name, checkpoint, recipe (what was hashed), how (trained, resumed, loaded), history
    trainable: list[bool] | None = None   # which of the model's parameters it trained (None: all)

    @property
    def seconds(self) -> float:
        """Wall time of the training as recorded (when it was trained, not when it was loaded)."""
        return sum(h["seconds"] for h in self.record["history"])

    @property
    def examples(self) -> int:
        """Training examples seen, over all epochs."""
        return sum(h["examples"] for h in self.record["history"])

    def flops_per_example(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """FLOPs of one training step (forward and backward of the loss) per example of (x, y)."""
        def step():
            self.loss(self.model, x, y).backward()

        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        for p, on in zip(params, self.trainable or [True] * len(params)):
            p.requires_grad_(on)   # as in training (a model frozen later, a classifier frozen then)
        self.model.train()
        try:
            return count_flops(step) / len(x)
        finally:
            for p, on in zip(params, flags):
                p.requires_grad_(on)
            self.model.zero_grad(set_to_none=True)
            if isinstance(self.loss, nn.Module):
                self.loss.zero_grad(set_to_none=True)
            self.model.eval()


def identity(model: nn.Module, loss_fn, recipe: dict, name: str, epochs: int, train_kwargs: dict) -> dict:
    """Everything that shapes a run's weights: the recipe, the loss's and the model's constructor
    arguments (see :mod:`defenses_lib.config`), the epochs and the schedule."""
    schedule = {k: v for k, v in train_kwargs.items() if k not in ("device", "show_progress", "desc")}
    return dict(recipe, name=name, loss=config(loss_fn), model=config(model), epochs=epochs, **schedule)


def fit(model: nn.Module, dataset, loss_fn, *, chapter: str, name: str, recipe: dict, epochs: int,
        **train_kwargs) -> Training:
    """``train`` with a checkpoint named by a hash of its :func:`identity` (a finished run is loaded).

    ``recipe`` names what shapes the weights besides the loss, the model and the schedule: the
    data and the initial weights. Returns the model in eval mode, on the device it trained on.
    """
    full = identity(model, loss_fn, recipe, name, epochs, train_kwargs)
    path = run_dir(chapter) / f"{name}-{recipe_hash(full)}.pt"
    done = load_checkpoint(path)["epoch"] if path.is_file() else 0
    history = train(model, dataset, loss_fn, epochs=epochs, checkpoint=path, desc=name, **train_kwargs)
    how = "finished run loaded" if done >= epochs else f"resumed after epoch {done}" if done else "trained now"
    rec = dict(name=name, checkpoint=str(path), recipe=full, how=how, history=history,
               device=str(model_device(model)))
    record("training", **rec)
    final = history[-1]["loss"] if history else float("nan")
    print(f"{name}: {epochs} epochs on {len(dataset)} images, {sum(h['seconds'] for h in history):.0f} s "
          f"of training, final training loss {final:.3f} ({how}, {path.name})")
    return Training(model.eval(), loss_fn, rec, [p.requires_grad for p in model.parameters()])


def train_each(P, train_set, losses: dict, *, chapter: str, arch: str | None = None, epochs: int,
               device=None, **schedule) -> dict[str, Training]:
    """One network per loss, each from the same initial weights, on the profile's data and schedule
    (any of it replaceable through ``schedule``). A loss with an ``lr`` attribute (ARMOR_D's dual
    variables) trains its own parameters with Adam at that rate."""
    kw = dict(P.schedule(), **schedule)
    arch = arch or P.arch
    out = {}
    for name, loss in losses.items():
        seed_everything(P.seed)  # the same initial weights for every model
        model = build_model(arch, P.dataset)
        recipe = dict(arch=arch, dataset=P.dataset, n_train=len(train_set), data_seed=P.seed)
        out[name] = fit(model, train_set, loss, chapter=chapter, name=name, recipe=recipe, epochs=epochs,
                        loss_lr=getattr(loss, "lr", None), device=device, **kw)
    return out


def step_time(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, repeat: int = 5) -> float:
    """Median seconds of one training step's forward and backward pass of ``loss_fn`` on (x, y); weights unchanged."""
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
    model.train()
    try:
        return timeit(step, repeat=repeat)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


class _FixedLogits(nn.Module):
    """A stand-in network whose output is fixed logits, to time a loss without the network."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def loss_time(loss_fn, logits: torch.Tensor, y: torch.Tensor, repeat: int = 200) -> float:
    """Median seconds of ``loss_fn``'s forward and backward pass on fixed ``logits`` (the network not run)."""
    def step():
        z = logits.detach().clone().requires_grad_(True)
        loss_fn(_FixedLogits(z), None, y).backward()
    return timeit(step, repeat=repeat)
