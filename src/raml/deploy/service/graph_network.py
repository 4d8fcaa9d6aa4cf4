"""The service's query network as one recorded graph per query size: a forward pass that never waits for the GIL.

Contract: :func:`record_graphs` traces ``network`` once per size with ``torch.jit.trace`` and keeps a size's
graph only when it computes exactly what the network computes (``torch.equal`` on probe batches of 1, 2 and 3
images at that size); a size whose graph differs, or whose tracing fails, is left out (the caller runs the network
itself there) and the reason is logged. Nothing is kept that was not checked.

Why: in ``raml serve`` the forward pass runs in the batching worker thread while the event loop runs Python on the
other core. An eager forward pass returns to Python between its ~70 operators, and every return needs the GIL,
which a busy event loop gives up only at the interpreter's switch interval (5 ms). Measured on the project's
2-core machine (2026-12-04; ResNet-18 + 128-d whitening, a batch of 32 at 32 px, one torch thread) while a second
thread ran pure Python: eager 83 ms alone and 831 ms beside it; the traced graph 77 ms alone and 80 ms beside it,
its output equal to the eager one bit for bit. A TorchScript graph runs all its operators in C++ with the GIL
released (see docs/deployment.md, *Threads*).

``torch.jit.trace`` is deprecated in favour of ``torch.export``/``torch.compile`` (a ``FutureWarning`` in torch
2.14, silenced here); neither of those runs a CPU forward pass without returning to Python between kernels
short of compiling C++ (AOTInductor). Where tracing is gone or fails, the service falls back to the eager
network, slower under load but the same numbers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PROBE_BATCHES", "record_graphs"]

logger = logging.getLogger(__name__)

PROBE_BATCHES: tuple[int, ...] = (2, 1, 3)  # traced at the first, checked at every one (a batch size baked in fails)
_PROBE_SEED = 20230103


def _probe(batch: int, size: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def _trace(network: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # the deprecation notice, and the tracer's notes on Python values (the network's input checks) that become
        # constants: the probes below decide whether the graph is kept
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        graph = torch.jit.trace(network, example, check_trace=False)
    return graph


@torch.inference_mode()
def record_graphs(network: nn.Module, sizes: Sequence[int], device: torch.device) -> dict[int, torch.jit.ScriptModule]:
    """Trace ``network`` (in eval mode, on ``device``) at each of ``sizes``; the graphs that match it exactly.

    Args:
        network: ``(B, 3, S, S)`` -> ``(B, D)``; must be in eval mode (a graph of a training-mode network would
            bake in batch statistics).
        sizes: Query sizes S.
        device: Where the network's parameters are.

    Returns:
        ``{size: graph}`` for each size whose graph gave outputs ``torch.equal`` to the network's on every batch
        of :data:`PROBE_BATCHES`; the other sizes are absent (logged with the reason).

    Raises:
        ValueError: If ``network`` is in training mode.
    """
    if network.training:
        raise ValueError("record_graphs needs a network in eval mode (call network.eval() first).")
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    graphs: dict[int, torch.jit.ScriptModule] = {}
    for size in sizes:
        probes = [_probe(batch, int(size), device, generator) for batch in PROBE_BATCHES]
        try:
            graph = _trace(network, probes[0])
            pairs = [(graph(p).float(), network(p).float()) for p in probes]
        except Exception as error:  # tracing is best effort: any failure leaves the eager network in charge
            logger.warning(
                "Query size %d: the network could not be traced (%s: %s); it runs eagerly (same numbers, slower "
                "beside a busy event loop).",
                size,
                type(error).__name__,
                error,
            )
            continue
        differs = [
            (int(mine.shape[0]), float((mine - theirs).abs().max()) if mine.shape == theirs.shape else "shape")
            for mine, theirs in pairs
            if not torch.equal(mine, theirs)
        ]
        if differs:
            logger.warning(
                "Query size %d: the traced network differs from the network (batch, max abs difference: %s); it "
                "runs eagerly (same numbers, slower beside a busy event loop).",
                size,
                differs,
            )
            continue
        graphs[int(size)] = graph
    if graphs:
        logger.info("Query network traced at size(s) %s (checked equal to the eager network)", sorted(graphs))
    return graphs
