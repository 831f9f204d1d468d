"""Where and how code runs: the device, seeds, progress bars, timing and the headless runner's records."""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from tqdm.auto import tqdm
from tqdm.std import tqdm as text_tqdm

PROGRESS_ENV = "DEFENSES_PROGRESS"  # "terminal": plain-text bars on the process's own stderr (headless runs)
METRICS_ENV = "DEFENSES_METRICS"    # a file the library appends what it trained and evaluated to (JSON lines)


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


def draw(kind: str, shape, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform ('rand') or Gaussian ('randn') noise of ``shape`` on ``device``, drawn there (with a
    ``generator``: on the generator's own device, then moved), so that no draw crosses devices by default."""
    fn = {"rand": torch.rand, "randn": torch.randn}[kind]
    where = generator.device if generator is not None else device
    return fn(tuple(shape), generator=generator, device=where).to(device)


def generator_for(device, seed: int) -> torch.Generator:
    """A generator on ``device`` (a device or a model, whose parameters' device is used), seeded."""
    device = model_device(device) if isinstance(device, nn.Module) else torch.device(device)
    return torch.Generator(device=device).manual_seed(seed)


def progress(iterable, desc: str | None = None, enabled: bool = True, **kwargs):
    """A ``tqdm.auto`` bar that closes when done; ``TQDM_DISABLE=1`` in the environment turns all bars
    off, and under torchrun only the first process shows them.

    With ``DEFENSES_PROGRESS=terminal`` (set by :mod:`defenses_lib.run`) the bar is plain text on the
    process's own stderr, updated every 30 s: a headless kernel's terminal, not the notebook's outputs.
    """
    # tqdm.notebook ignores TQDM_DISABLE itself, so it is read here
    quiet = os.environ.get("TQDM_DISABLE") == "1" or os.environ.get("RANK", "0") != "0"
    if not enabled or quiet:
        kwargs["disable"] = True
    if os.environ.get(PROGRESS_ENV) == "terminal":
        return text_tqdm(iterable, desc=desc, leave=False, file=sys.__stderr__, mininterval=30, **kwargs)
    return tqdm(iterable, desc=desc, leave=False, **kwargs)


def record(kind: str, **fields) -> None:
    """Append ``{"kind": kind, **fields}`` as a JSON line to the file ``$DEFENSES_METRICS`` names, if any
    (the headless runner's metrics; nothing else reads it)."""
    path = os.environ.get(METRICS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")


class FlopCount(TorchDispatchMode):
    """Counts the floating-point operations of the matrix products and convolutions run inside it,
    forward and backward, as ``torch.utils.flop_counter`` counts them (elementwise work is not counted).

    Unlike ``FlopCounterMode`` it tracks no modules, so it also counts ``torch.autograd.grad`` with
    respect to inputs (attacks, Hessian-vector products).
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


def count_flops(fn) -> int:
    """The FLOPs (see :class:`FlopCount`) of one call of ``fn()``."""
    with FlopCount() as counter:
        fn()
    return counter.flops


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


def timing_rounds(fns: dict, rounds: int = 5, repeat: int = 1, warmup: int = 1) -> dict[str, list[float]]:
    """Each ``fns[name]()``'s wall time in seconds in every one of ``rounds`` interleaved rounds.

    Each round times every function in turn (the median of ``repeat`` calls), so that a burst of load
    on a shared machine slows all of them alike instead of whichever happened to be timed during it;
    paired rounds also give the spread of the ratio of two functions' times.
    """
    if rounds < 1 or repeat < 1 or warmup < 0:
        raise ValueError(f"rounds and repeat must be >= 1 and warmup >= 0, got rounds={rounds}, repeat={repeat}, "
                         f"warmup={warmup}")
    from . import estimate   # (runtime is imported by estimate)

    out = {name: [] for name in fns}
    run = estimate.cap(rounds, 2)   # every round, except in estimate mode
    with estimate.stage("timing", rounds, run):
        for i in range(run):
            for name, fn in fns.items():
                out[name].append(timeit(fn, repeat=repeat, warmup=warmup if i == 0 else 0))
    return out


def atomic_write(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder, flushed to disk, then renamed to ``path``:
    never half a file. Temporary files that an earlier, killed write of ``path`` left are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stored_results(name: str, key: str = "model") -> dict[str, dict]:
    """The JSON result files of a headless run stored under the repository's ``results/<name>/``
    (found from the working folder, its parent, or beside the package), by their ``key`` field."""
    here = Path(__file__).resolve().parent.parent
    folders = [Path("results"), Path("..") / "results", here / "results"]
    folder = next((f / name for f in folders if (f / name).is_dir()), folders[0] / name)
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return {r[key]: r for r in runs}
