"""Where and how code runs: the device, seeds, progress bars and timing."""

from __future__ import annotations

import os
import random
import statistics
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


def pick_device(prefer: str | None = None) -> torch.device:
    """The given device, else CUDA, then Apple MPS, then the CPU."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def progress(iterable, desc: str | None = None, enabled: bool = True, **kwargs):
    """A ``tqdm.auto`` bar that closes when done; ``TQDM_DISABLE=1`` in the environment turns all bars off."""
    if not enabled or os.environ.get("TQDM_DISABLE") == "1":  # tqdm.notebook ignores the variable itself
        kwargs["disable"] = True
    return tqdm(iterable, desc=desc, leave=False, **kwargs)


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """The median wall time of ``fn()`` in seconds over ``repeat`` calls, after ``warmup`` untimed ones."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare_times(fns: dict, repeat: int = 5, warmup: int = 1) -> dict:
    """The fastest wall time in seconds of each ``fns[name]()``, timed in interleaved rounds.

    Each round calls every function once, in turn, so that a burst of load on a shared machine
    slows all of them alike instead of whichever happened to be timed during it.
    """
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    rounds = [{name: timeit(fn, repeat=1, warmup=warmup if i == 0 else 0) for name, fn in fns.items()}
              for i in range(repeat)]
    return {name: min(r[name] for r in rounds) for name in fns}
