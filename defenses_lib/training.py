"""One training loop for every chapter, with pluggable losses, seeds, progress and resumable checkpoints.

A loss is any callable ``loss_fn(model, x, y) -> scalar``. If it is an ``nn.Module`` with parameters
of its own (a learned dual variable, say), the loop optimises them too and saves them in the
checkpoint: with the model's optimizer, or with Adam at ``loss_lr`` when that is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import distributed
from .attacks import attack_mode, check_inputs, pgd, project
from .models import build_model
from .runtime import FlopCount, atomic_write, pick_device, progress, record, seed_everything, timeit

RUNS_ENV = "DEFENSES_RUNS"


class CrossEntropy(nn.Module):
    """Standard training: cross-entropy on clean inputs."""

    def forward(self, model, x, y):
        return F.cross_entropy(model(x), y)


class PGDAdversarialLoss(nn.Module):
    """Madry et al.'s adversarial training: cross-entropy on PGD examples made against the current model.

    ``steps=1, alpha=eps, random_start=False`` is FGSM adversarial training (Goodfellow et al.).
    """

    def __init__(self, eps: float, steps: int = 7, alpha: float | None = None, norm: str = "linf",
                 random_start: bool = True):
        super().__init__()
        check_inputs(torch.zeros(1, 1, 1, 1), eps=eps, norm=norm)
        self.eps, self.steps, self.alpha, self.norm, self.random_start = eps, steps, alpha, norm, random_start

    def extra_repr(self) -> str:
        start = "" if self.random_start else ", random_start=False"
        return f"eps={self.eps}, steps={self.steps}, alpha={self.alpha}, norm={self.norm!r}{start}"

    def forward(self, model, x, y):
        x_adv = pgd(model, x, y, self.eps, self.alpha, self.steps, self.norm, random_start=self.random_start,
                    early_stop=False)
        return F.cross_entropy(model(x_adv), y)


class TradesLoss(nn.Module):
    """TRADES (Zhang et al.): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL in the l_inf ball."""

    def __init__(self, eps: float, beta: float = 6.0, steps: int = 7, alpha: float | None = None):
        super().__init__()
        check_inputs(torch.zeros(1, 1, 1, 1), eps=eps)
        self.eps, self.beta, self.steps = eps, beta, steps
        self.alpha = 2.5 * eps / steps if alpha is None else alpha

    def extra_repr(self) -> str:
        return f"eps={self.eps}, beta={self.beta}, steps={self.steps}, alpha={self.alpha}"

    def adversary(self, model, x):
        """The KL-maximising point x' (TRADES' inner problem), started at x + 0.001 * noise."""
        with attack_mode(model):
            p_clean = F.softmax(model(x), 1).detach()
            x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
                grad, = torch.autograd.grad(kl, x_adv)
                x_adv = project(x_adv.detach() + self.alpha * grad.sign(), x, self.eps, "linf")
        return x_adv

    def forward(self, model, x, y):
        x_adv = self.adversary(model, x)
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * kl


def recipe_hash(recipe: dict) -> str:
    """A short stable hash of a JSON-able recipe, to name its checkpoint."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_dir(*parts: str) -> Path:
    """Where runs write checkpoints: $DEFENSES_RUNS, else ./runs; created if missing."""
    path = Path(os.environ.get(RUNS_ENV, "runs")).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike, device=None) -> dict:
    """Load a checkpoint safely (``weights_only=True``)."""
    return torch.load(path, map_location=device or "cpu", weights_only=True)


def _optimizer(params, name: str, lr: float, weight_decay: float, momentum: float):
    """SGD (with momentum) or Adam."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def _epoch_loader(dataset, batch_size: int, seed: int, epoch: int) -> DataLoader:
    """The epoch's loader; its order depends only on (seed, epoch), so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, drop_last=False)


def train(model: nn.Module, dataset, loss_fn, *, epochs: int, batch_size: int = 128, optimizer: str = "adam",
          lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9, milestones=(), gamma: float = 0.1,
          loss_lr: float | None = None, seed: int = 0, checkpoint: str | os.PathLike | None = None, device=None,
          desc: str = "train", show_progress: bool = True) -> list[dict]:
    """Train ``model`` on ``dataset`` with ``loss_fn`` and return the per-epoch history.

    With ``checkpoint``, the state is saved atomically after every epoch; a run started again with
    the same arguments resumes where it stopped and ends with the same weights as an uninterrupted
    run. A finished checkpoint is simply loaded. ``milestones`` are the epochs where lr is multiplied
    by ``gamma``. A loss with a ``set_epoch(epoch)`` method (a schedule) is told each epoch first.
    The loss's own parameters, if any, get their own Adam optimizer at ``loss_lr`` (no schedule) when
    ``loss_lr`` is given, else they join the model's optimizer.

    Launched by ``torchrun`` with several processes, the model trains in DistributedDataParallel, each
    process on its slice of every batch (see :mod:`defenses_lib.distributed`); only the first process
    writes the checkpoint and shows progress.
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got epochs={epochs}, batch_size={batch_size}")
    distributed.setup()
    device = device or distributed.local_device()
    device = pick_device(device) if not isinstance(device, torch.device) else device
    model.to(device)
    loss_fn = loss_fn.to(device) if isinstance(loss_fn, nn.Module) else loss_fn
    extra = list(loss_fn.parameters()) if isinstance(loss_fn, nn.Module) else []
    opts = [_optimizer(list(model.parameters()) + (extra if loss_lr is None else []), optimizer, lr, weight_decay, momentum)]
    if extra and loss_lr is not None:
        opts.append(_optimizer(extra, "adam", loss_lr, 0.0, momentum))
    sched = torch.optim.lr_scheduler.MultiStepLR(opts[0], list(milestones), gamma)
    seed_everything(seed)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint, device)
        model.load_state_dict(state["model"])
        for o, o_state in zip(opts, state["optimizer"]):
            o.load_state_dict(o_state)
        sched.load_state_dict(state["scheduler"])
        if isinstance(loss_fn, nn.Module):
            loss_fn.load_state_dict(state["loss"])
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])
        start, history = state["epoch"], state["history"]
    net = distributed.wrap(model, device)
    for epoch in range(start, epochs):
        if hasattr(loss_fn, "set_epoch"):  # losses with a schedule (an h or eps ramp) follow the epoch
            loss_fn.set_epoch(epoch)
        history.append(_run_epoch(net, dataset, loss_fn, opts, extra, batch_size, seed, epoch, device,
                                  f"{desc} {epoch + 1}/{epochs}", show_progress and distributed.is_main()))
        sched.step()
        if checkpoint is not None and distributed.is_main():
            atomic_save({"model": model.state_dict(), "optimizer": [o.state_dict() for o in opts], "scheduler": sched.state_dict(),
                         "loss": loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {},
                         "rng": torch.get_rng_state(), "epoch": epoch + 1, "history": history,
                         "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                        checkpoint)
    model.eval()
    return history


def _run_epoch(model, dataset, loss_fn, opts, extra, batch_size, seed, epoch, device, desc, show_progress) -> dict:
    """One pass over the data (this process's slice of each batch); returns the mean loss, the examples seen,
    the wall time and the FLOPs per example of the epoch's first step (forward and backward, see ``FlopCount``)."""
    model.train()
    total, seen, flops, t0 = 0.0, 0, None, time.perf_counter()
    bar = progress(_epoch_loader(dataset, batch_size, seed, epoch), desc, enabled=show_progress)
    for x, y in bar:
        x, y, share = distributed.shard(x.to(device), y.to(device))
        with FlopCount() if flops is None else contextlib.nullcontext() as counter:
            loss = loss_fn(model, x, y)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            (loss * share).backward()
        if flops is None:
            flops = counter.flops / len(y)
        distributed.average_gradients(extra)
        for opt in opts:
            opt.step()
        total += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{total / seen:.3f}", refresh=False)
    return {"epoch": epoch + 1, "loss": total / max(seen, 1), "examples": seen, "seconds": time.perf_counter() - t0,
            "flops_per_example": flops}


def fit(model: nn.Module, dataset, loss_fn, *, chapter: str, name: str, recipe: dict, epochs: int,
        **train_kwargs) -> nn.Module:
    """``train`` with a checkpoint named by the recipe's hash (a finished run is loaded); returns the model in eval mode on the CPU.

    ``recipe`` must identify everything that shapes the weights besides the loss, the epochs and
    ``train_kwargs`` (which are added to it): the data, the architecture, the initial weights.
    """
    full = dict(recipe, name=name, loss=repr(loss_fn), epochs=epochs, **train_kwargs)
    full.pop("device", None)
    path = run_dir(chapter) / f"{name}-{recipe_hash(full)}.pt"
    done = load_checkpoint(path)["epoch"] if path.is_file() else 0
    history = train(model, dataset, loss_fn, epochs=epochs, checkpoint=path, desc=name, **train_kwargs)
    how = "finished run loaded" if done >= epochs else f"resumed after epoch {done}" if done else "trained now"
    record("training", name=name, checkpoint=str(path), recipe=full, how=how, history=history)
    print(f"{name}: {epochs} epochs on {len(dataset)} images, {sum(h['seconds'] for h in history):.0f} s of training, "
          f"final training loss {history[-1]['loss'] if history else float('nan'):.3f} ({how}, {path.name})")
    return model.cpu().eval()


def train_models(P, train_set, losses: dict[str, nn.Module], *, arch: str, epochs: int, device=None,
                 chapter: str, **schedule) -> dict[str, nn.Module]:
    """Train one ``arch`` per loss on the same data, seed and schedule: the profile's batch size, optimizer,
    lr, momentum and milestones, each replaceable through ``schedule``.

    A loss with an ``lr`` attribute (ARMOR_D's dual variables) trains its own parameters with Adam at
    that rate; the trained loss objects keep them. Returns the models in eval mode on the CPU.
    """
    kw = dict(batch_size=P.batch_size, optimizer=P.optimizer, lr=P.lr, momentum=P.momentum, milestones=P.milestones)
    kw.update(schedule)
    models = {}
    for name, loss in losses.items():
        seed_everything(P.seed)  # the same initial weights for every model
        model = build_model(arch, P.dataset)
        recipe = dict(arch=arch, dataset=P.dataset, n_train=len(train_set), seed=P.seed)
        fit(model, train_set, loss, chapter=chapter, name=name, recipe=recipe, epochs=epochs,
            loss_lr=getattr(loss, "lr", None), seed=P.seed, device=device, **kw)
        loss.cpu()
        models[name] = model
    return models


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
