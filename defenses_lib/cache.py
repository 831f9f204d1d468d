"""Finished evaluations kept on disk, so that a resumed or repeated run recomputes nothing finished.

An evaluation (one row of ``evaluate``, a sanity-check report, a certificate) is stored under
``$DEFENSES_RUNS/evaluations/`` by a hash of everything that determines it: what is evaluated
(each model's class, settings and weights), the attack (its function, code, arguments, free
variables, and the values, models and tensors it reads from its module's globals), the images, the library's source and
the state of every random generator it draws from. The entry keeps the result and the generators'
state after the computation; a hit restores that state, so a resumed run draws exactly what an
uninterrupted one would and ends with identical results. ``DEFENSES_EVAL_CACHE=0`` turns it off;
an estimate run (see :mod:`defenses_lib.estimate`) never uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import types
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from . import distributed, estimate

CACHE_ENV = "DEFENSES_EVAL_CACHE"
SIMPLE = (str, int, float, bool, type(None))


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of the library's source: any change to it makes every stored evaluation stale."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


_digests: dict[int, tuple] = {}   # id(tensor) -> (weak reference, version, digest), while the tensor lives


def _tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's shape, dtype and values; remembered while the tensor lives and is not
    changed in place (its version counter), so a model's weights are hashed once per change."""
    known = _digests.get(id(t))
    if known is not None and known[0]() is t and known[1] == t._version:
        return known[2]
    digest = _compute_digest(t)
    key = id(t)

    def forget(ref, key=key):
        """Drop the entry when its tensor dies (unless the id now belongs to another tensor's entry)."""
        if _digests.get(key, (None,))[0] is ref:
            del _digests[key]

    _digests[key] = (weakref.ref(t, forget), t._version, digest)
    return digest


def _compute_digest(t: torch.Tensor) -> str:
    """``_tensor_digest`` computed."""
    shape, dtype = tuple(t.shape), t.dtype
    t = t.detach().cpu().contiguous().reshape(-1)
    data = t.to(torch.uint8) if t.dtype == torch.bool or not t.numel() else t.view(torch.uint8)
    return f"{shape}:{dtype}:" + hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _function(f, seen) -> dict:
    """A function: its name, code, defaults, free variables and the simple module values it reads."""
    code = f.__code__
    reads = {n: f.__globals__[n] for n in code.co_names if n in f.__globals__}
    return {"function": f"{f.__module__}.{f.__qualname__}",
            "code": hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest(),
            "defaults": describe(f.__defaults__, seen), "kwdefaults": describe(f.__kwdefaults__, seen),
            "closure": [describe(c.cell_contents, seen) for c in f.__closure__ or ()],
            "reads": {n: describe(v, seen) for n, v in reads.items()   # a notebook's globals it reads
                      if isinstance(v, (*SIMPLE, tuple, dict, torch.Tensor, nn.Module, functools.partial))
                      or dataclasses.is_dataclass(v)}}


def _module(m: nn.Module, seen, with_state: bool) -> dict:
    """A module: its class, its own settings, its children and (at the top) a digest of its weights."""
    attrs = {k: describe(v, seen) for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
    out = {"class": f"{type(m).__module__}.{type(m).__qualname__}", "attrs": attrs,
           "children": {k: _module(c, seen, False) for k, c in m.named_children()}}
    if with_state:
        tensors = itertools.chain(m.named_parameters(), m.named_buffers())   # the live tensors, not copies
        out["state"] = {k: _tensor_digest(v) for k, v in tensors}
    return out


def describe(obj, seen=None):
    """A JSON-able description of ``obj`` that changes whenever what it computes could."""
    seen = set() if seen is None else seen
    if isinstance(obj, SIMPLE):
        return obj if not isinstance(obj, float) or obj == obj else "nan"
    if id(obj) in seen:
        return "<cycle>"
    seen = seen | {id(obj)}
    if isinstance(obj, (list, tuple)):
        return [describe(v, seen) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, seen) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return _tensor_digest(obj)
    if isinstance(obj, torch.Generator):
        return {"generator": str(obj.device), "state": _tensor_digest(obj.get_state())}
    if isinstance(obj, nn.Module):
        return _module(obj, seen, True)
    if isinstance(obj, functools.partial):
        return {"partial": describe(obj.func, seen), "args": describe(obj.args, seen),
                "keywords": describe(obj.keywords, seen)}
    if isinstance(obj, types.FunctionType):
        return _function(obj, seen)
    if isinstance(obj, types.MethodType):
        return {"method": describe(obj.__func__, seen), "of": describe(obj.__self__, seen)}
    return repr(obj)   # a repr with a memory address only ever misses: never a wrong hit


def _rng_state(generators) -> list[torch.Tensor]:
    """The global CPU and CUDA generators' states and those of ``generators``."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return [torch.get_rng_state(), *cuda, *(g.get_state() for g in generators)]


def _set_rng_state(states: list[torch.Tensor], generators) -> None:
    """Restore what ``_rng_state`` saved."""
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    torch.set_rng_state(states[0].cpu())
    if n_cuda:
        torch.cuda.set_rng_state_all([s.cpu() for s in states[1:1 + n_cuda]])
    for g, s in zip(generators, states[1 + n_cuda:]):
        g.set_state(s.to(g.get_state().device))


def key(kind: str, parts, generators=()) -> str:
    """The hash an evaluation is stored under."""
    what = {"kind": kind, "library": source_digest(), "parts": describe(parts),
            "rng": [_tensor_digest(s) for s in _rng_state(generators)], "world": os.environ.get("WORLD_SIZE", "1")}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached(kind: str, parts, compute, generators=()) -> tuple:
    """``(compute(), False)``, or ``(its stored result, True)`` when the same evaluation (``parts``, the
    library, the random state) finished before. The result must be tensors, numbers, strings and
    containers of them. Only the first process writes (under torchrun every process computes the same key)."""
    from .training import CheckpointError, atomic_save, load_checkpoint, run_dir

    if os.environ.get(CACHE_ENV) == "0" or estimate.active():   # an estimate run must measure, not read back
        return compute(), False
    path = run_dir("evaluations") / f"{kind}-{key(kind, parts, generators)}.pt"
    if path.is_file():
        try:
            entry = load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"{e}: computing it again", stacklevel=2)
        else:
            _set_rng_state(entry["rng_after"], generators)
            return entry["value"], True
    value = compute()
    if distributed.is_main():
        atomic_save({"value": value, "rng_after": _rng_state(generators)}, path)
    return value, False
