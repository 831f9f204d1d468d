"""What a whole run would cost, from a few steps of each stage: ``python -m defenses_lib.run
CHAPTER --profile paper --estimate``.

In estimate mode (``DEFENSES_ESTIMATE=1`` in the kernel's environment, set by the runner) the
library's long loops run only their first few iterations:

- each training, its first ``TRAIN_BATCHES`` batches (of the first epoch), no checkpoint written;
- each attack run, its first ``IMAGES`` images, and each PGD its first ``ATTACK_STEPS`` steps;
  AutoAttack and Square run ``1 / QUERY_SHARE`` of their iterations and queries, and AutoAttack's
  'rand' version one EOT draw per step;
- each prediction, its first ``IMAGES`` images; each certificate, its first image and first batch
  of noise;
- each timing study (``runtime.timing_rounds``), its first two rounds;
- a training set larger than the data at hand (CIFAR-10's offline copy has 4,000 training
  images) counts as the profile's ``n_train`` images.

Each such loop is a *stage*. Its own time and FLOPs (matrix products and convolutions, forward and
backward, counted as ``torch.utils.flop_counter`` counts them) are multiplied by the ratio of the
iterations it would have run to those it ran, and by the same ratios of the loops around it. The
estimate is the sum over stages plus the time of everything else, as measured; on a GPU, the stages'
FLOPs over a stated sustained throughput. The results of an estimate run are meaningless (most
images are never attacked); only its costs are kept.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

from .runtime import FlopCount, record

ENV = "DEFENSES_ESTIMATE"
TRAIN_BATCHES = 2
IMAGES = 8
ATTACK_STEPS = 2
QUERY_SHARE = 20
STAGES = ("training", "attacks", "predictions", "certificates", "timing")

_stack: list[list] = []   # the stages running now, outermost first: [kind, factor, inner seconds, inner FLOPs]
_data_scale = [1.0]       # training images the profile asks for, per image at hand


def active() -> bool:
    """Whether this process runs in estimate mode."""
    return os.environ.get(ENV) == "1"


def cap(n: int, first: int) -> int:
    """How many of ``n`` iterations a loop runs: ``first`` in estimate mode (at least one), else all."""
    return min(n, max(first, 1)) if active() else n


def set_data_scale(asked: int, at_hand: int) -> None:
    """Count every training as if its data had ``asked`` images where there are ``at_hand``."""
    _data_scale[0] = asked / at_hand


@contextmanager
def stage(kind: str, planned: float, done: float, data: bool = False):
    """Account the block as ``done`` of the ``planned`` iterations of a stage of ``kind`` (with
    ``data``, also scaled to the profile's training-set size); a stage inside another counts as
    part of the outer one's kind (PGD inside adversarial training is training). Does nothing
    outside estimate mode."""
    if not active():
        yield
        return
    factor = planned / max(done, 1) * (_data_scale[0] if data else 1.0)
    frame = [_stack[0][0] if _stack else kind, factor, 0.0, 0]
    _stack.append(frame)
    counter, t0 = FlopCount(), time.perf_counter()
    try:
        with counter:
            yield
    finally:
        seconds = time.perf_counter() - t0
        _stack.pop()
        scale = math.prod(f[1] for f in _stack) * factor
        own_seconds, own_flops = seconds - frame[2], counter.flops - frame[3]
        if _stack:
            _stack[-1][2] += seconds
            _stack[-1][3] += counter.flops
        record("estimate", stage=frame[0], seconds=own_seconds, flops=own_flops, scale=scale)


def summary(records: list[dict], cell_seconds: float, gpu_tflops: float) -> dict:
    """The whole run's estimate from an estimate run's records and its cells' total time."""
    stages = {}
    for kind in STAGES:
        rs = [r for r in records if r.get("kind") == "estimate" and r["stage"] == kind]
        flops = sum(r["flops"] * r["scale"] for r in rs)
        stages[kind] = {"measured seconds": sum(r["seconds"] for r in rs),
                        "estimated seconds": sum(r["seconds"] * r["scale"] for r in rs),
                        "estimated FLOPs": flops, "GPU seconds": flops / (gpu_tflops * 1e12)}
    measured = sum(s["measured seconds"] for s in stages.values())
    other = max(cell_seconds - measured, 0.0)
    cpu = other + sum(s["estimated seconds"] for s in stages.values())
    gpu = sum(s["GPU seconds"] for s in stages.values())
    return {"stages": stages, "other seconds": other, "CPU seconds": cpu, "GPU seconds": gpu,
            "GPU TFLOP/s": gpu_tflops}


def duration(seconds: float) -> str:
    """Seconds as a readable duration: 42 s, 12 min, 3.4 h or 5.1 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def report(chapter: str, s: dict, profile: str = "paper") -> str:
    """The estimate as lines of text."""
    lines = [f"{chapter}, {profile} profile: about {duration(s['CPU seconds'])} on this machine's CPU; "
             f"its stages' {sum(v['estimated FLOPs'] for v in s['stages'].values()):.3g} FLOPs take about "
             f"{duration(s['GPU seconds'])} on one GPU sustaining {s['GPU TFLOP/s']:g} TFLOP/s"]
    for kind, v in s["stages"].items():
        lines.append(f"  {kind:<13} {duration(v['estimated seconds']):>10} on this CPU, "
                     f"{duration(v['GPU seconds']):>10} on the GPU ({v['estimated FLOPs']:.3g} FLOPs; "
                     f"{v['measured seconds']:.0f} s measured)")
    lines.append(f"  {'other':<13} {duration(s['other seconds']):>10} as measured (set-up, analysis, figures)")
    return "\n".join(lines)
