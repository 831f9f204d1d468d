"""What an object was built with: every loss, cost and composite model records its constructor's
arguments, so its ``repr`` and its checkpoint's name come from all of them, never a hand-written list.

``Configured`` is a mixin (d2l's ``save_hyperparameters`` idea): a subclass's ``__init__``
arguments, defaults filled in, are kept in ``_config``. :func:`config` turns any object into a
JSON-able description built from them; ``training.fit`` hashes it to name a checkpoint.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


class Configured:
    """Keeps the bound arguments of the most derived ``__init__`` as ``self._config``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)

    def extra_repr(self) -> str:
        """Every constructor argument, as ``name=value``."""
        return ", ".join(f"{k}={v!r}" for k, v in getattr(self, "_config", {}).items()
                         if not isinstance(v, nn.Module))

    def __repr__(self) -> str:
        if isinstance(self, nn.Module):
            return nn.Module.__repr__(self)
        return f"{type(self).__name__}({self.extra_repr()})"


def _recording(init):
    """``init`` that first stores its bound arguments (the outermost call wins)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        if "_config" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop("self")
            object.__setattr__(self, "_config", arguments)
        init(self, *args, **kwargs)

    return wrapped


def config(obj):
    """A JSON-able description of ``obj``: its class and constructor arguments, recursively."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (list, tuple)):
        return [config(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): config(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if "_config" in getattr(obj, "__dict__", {}):
        return {"class": type(obj).__qualname__, **{k: config(v) for k, v in obj._config.items()}}
    if isinstance(obj, torch.Generator):
        return f"Generator(initial_seed={obj.initial_seed()})"
    return repr(obj)  # a module's repr lists its layers and their sizes
