"""Multi-process training on PyTorch's own engine (``torchrun``), one process per GPU (or CPU with gloo).

``torchrun --nproc_per_node N -m raml train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init_distributed` turns them into a :class:`DistContext` and the process's device. Without them
everything runs as a single process and every helper here is the identity.

Data parallelism with the same result as one process: every rank builds the same global batch (same
seeded generator), takes a contiguous share of it, and losses (sums over images) are multiplied by the
world size before ``backward`` so that DistributedDataParallel's gradient *average* equals the
single-process gradient *sum*. Embeddings for validation and mining are extracted in shards and gathered.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = DistContext()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` (the last step of ``raml`` and ``python -m raml``, ``raml.__main__.run``). A
    process that joined a process group ends without the interpreter's finalisation: its threads end as at a normal
    exit (``threading._shutdown``: the executors' idle workers told to stop, non-daemon threads joined), the group
    is destroyed, the ``atexit`` functions run (logging's flush among them), standard output and error are flushed,
    and then ``os._exit(code)``. Without a process group this is ``raise SystemExit(code)``.

    Why: with the interpreter's own shutdown a rank could abort after its work was done and written ("terminate
    called without an active exception", SIGABRT), and torchrun then reported the run as failed. Seen with
    ``torchrun --nproc_per_node 2 -m raml extract`` on a 2-core machine kept busy by two other processes in 2 of
    99 runs (rank 1 both times, after the ``atexit`` function below had destroyed its group) and once in ``make
    test``; Python's fault handler showed the main thread with no Python frame left, so the abort came from native
    code at the very end. The likely cause (described in PyTorch pull request 179291): a backend thread still
    releasing a finished collective's tensors needs the GIL, which a finalising interpreter refuses by ending the
    thread, and a C++ thread ended that way aborts the process. With this function: 0 of 90 runs under the same
    load (too few to show the rate fell; what changed is that no finalisation runs).
    """
    if dist.is_initialized():
        # the interpreter's own first step at exit: the threading module's exit hooks (an executor's idle workers
        # are told to stop) and then every non-daemon thread joined
        threading._shutdown()
        _destroy_process_group()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, OSError, ValueError):  # None, closed or gone: nothing to lose
                stream.flush()
        os._exit(code)
    raise SystemExit(code)


def _environment_int(name: str, default: str | None = None) -> int:
    """The integer in environment variable ``name`` (``default`` when unset); another value is a ``ValueError``
    naming it."""
    text = os.environ.get(name, default)
    try:
        return int(text)  # type: ignore[arg-type]  # set, or a default given
    except (TypeError, ValueError):
        raise ValueError(
            f"The environment variable {name}={text!r} is not an integer; torchrun sets it (launch with torchrun, "
            f"or unset WORLD_SIZE for one process)."
        ) from None


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device | None]:
    """Join the process group when launched by torchrun; returns the context and this rank's device.

    The device is None for a single process (the caller chooses it as usual). With CUDA each rank uses
    ``cuda:LOCAL_RANK`` and the nccl backend; on CPU (or ``--device cpu``) the gloo backend.
    """
    world_size = _environment_int("WORLD_SIZE", "1")
    if world_size <= 1:
        return SINGLE, None
    if "RANK" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={world_size} is set without RANK (and LOCAL_RANK): launch several processes with torchrun "
            "(torchrun --nproc_per_node N -m raml ...), which sets them all, or unset WORLD_SIZE for one process."
        )
    rank, local_rank = _environment_int("RANK"), _environment_int("LOCAL_RANK", "0")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size}); launch with torchrun, which sets both.")
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # left alive at exit, the backend's threads can abort the process ("terminate called without an
        # active exception") after its work is done, when the other ranks finished first
        atexit.register(_destroy_process_group)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    logger.info("Process %d of %d on %s", rank, world_size, device)
    return DistContext(rank, world_size, local_rank), device


def all_gather_rows(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor along rows in rank order; shapes may differ in n_r."""
    if not ctx.enabled:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum over ranks (identity for a single process)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients_(parameters: Iterable[torch.nn.Parameter], ctx: DistContext) -> None:
    """Average the gradients of ``parameters`` (a method's own, outside DDP) over the processes, in place; nothing
    for a single process.

    Every process takes part in the same all-reduces whatever gradients it holds: a parameter without a gradient
    on this process (its loss did not reach it, e.g. UGD's projectors when this process's share of the batch has
    no unambiguous region) counts as a zero gradient when another process has one, and stays without one when no
    process has (as in one process, whose optimizer then skips it). One all-reduce of which gradients exist first.
    """
    if not ctx.enabled:
        return
    params = list(parameters)
    if not params:
        return
    held = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=params[0].device)
    for param, holders in zip(params, all_reduce_sum_(held, ctx).tolist(), strict=True):
        if holders == 0:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        all_reduce_sum_(param.grad, ctx).div_(ctx.world_size)


def all_reduce_min_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place minimum over ranks (identity for a single process)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (the identity for a single process)."""
    if not ctx.enabled:
        return obj
    holder = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shard_bounds(count: int, ctx: DistContext) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of ``count`` items (uneven shares allowed)."""
    per = -(-count // ctx.world_size)
    return min(count, ctx.rank * per), min(count, (ctx.rank + 1) * per)


def no_rows(batch: T) -> T:
    """``batch`` with every tensor cut to its first 0 rows (a loaded batch's structure, dtypes and trailing shapes
    kept): a tensor, or lists, tuples and dicts of them, nested; any other value as it is. The batch of a process
    whose share of a global batch is empty (:meth:`raml.engine.trainer.Trainer.load_shares`)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0] if batch.dim() else batch  # type: ignore[return-value]
    if isinstance(batch, (list, tuple)):
        return type(batch)(no_rows(item) for item in batch)  # type: ignore[return-value]
    if isinstance(batch, dict):
        return {key: no_rows(value) for key, value in batch.items()}  # type: ignore[return-value]
    return batch
