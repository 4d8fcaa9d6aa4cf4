"""Building a network whose every weight a checkpoint is about to replace, without drawing random weights first.

A backbone's constructor initialises its weights at random: every convolution draws ``kaiming_uniform_`` in its
``reset_parameters``, then torchvision's ResNet draws them again with ``kaiming_normal_``. On one core that was
93 of the 111 ms of building a ResNet-18 and 157 of the 194 ms of a ResNet-50 (2026-12-05, docs/benchmarks.md),
all thrown away when :func:`raml.models.checkpoints.network_from_checkpoint` loads the state dict, which it does
only when the checkpoint holds every parameter and persistent buffer (a missing key is an error).

:func:`weight_init_skipped` makes the initialisers of ``torch.nn.init`` return their tensor unchanged, in the
calling thread only, for the duration of a ``with`` block: a network built meanwhile in another thread is
initialised as usual. The module's functions are swapped for pass-through wrappers while at least one block is
open in any thread, and restored when the last one closes. The skipped tensors hold whatever ``torch.empty``
left in them: use this only where a load that replaces every one of them follows.

Skipping also leaves torch's global random generator where it was (the initialisers draw from it); raml's
training draws from generators of its own (``raml.data.views``, ``raml.data.sizes``, the epoch generator), so
no run depends on how many numbers a checkpoint's load drew.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["INITIALISERS", "weight_init_skipped"]

#: the ``torch.nn.init`` functions skipped (each takes the tensor first and returns it)
INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)

_lock = threading.Lock()
_open_blocks = 0  # blocks open in any thread; the wrappers are installed while > 0
_originals: dict[str, Callable[..., Any]] = {}
_local = threading.local()  # .depth: blocks open in this thread


def _skipping() -> bool:
    return getattr(_local, "depth", 0) > 0


def _pass_through(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def initialiser(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _skipping():
            return tensor
        return original(tensor, *args, **kwargs)

    initialiser.__name__ = initialiser.__qualname__ = name
    initialiser.__doc__ = original.__doc__
    initialiser.__wrapped__ = original  # type: ignore[attr-defined]
    return initialiser


@contextmanager
def weight_init_skipped() -> Iterator[None]:
    """In this thread, ``torch.nn.init``'s initialisers leave their tensors as they are (see the module docstring)."""
    global _open_blocks
    with _lock:
        if _open_blocks == 0:
            for name in INITIALISERS:
                original = getattr(torch.nn.init, name, None)
                if original is not None:
                    _originals[name] = original
                    setattr(torch.nn.init, name, _pass_through(name, original))
        _open_blocks += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        with _lock:
            _open_blocks -= 1
            if _open_blocks == 0:
                for name, original in _originals.items():
                    setattr(torch.nn.init, name, original)
                _originals.clear()
