"""Optimizers, parameter groups and learning-rate schedules (SPEC section 5).

Parameter groups: the backbone and the whitening learn at ``lr`` with weight decay; the pooling exponent
(GeM ``p``) learns at 10 x ``lr`` (per-channel GeM: 100 x) without weight decay, since it is a single
(or per-channel) scalar that should move faster than the weights and must not be pulled towards 0.

As in the reference, ``onecycle`` and ``cyclic`` are built with one ``max_lr = lr`` by default, which
overrides those multipliers: every group, ``p`` included, follows the same schedule peaking at ``lr``
(the multipliers only act with ``exponential`` or no scheduler). ``--group-lr-peaks`` keeps them.

The optimizers take PyTorch's fused implementation (one kernel over all parameters per step, ``fused=True``)
wherever every parameter is a float32/float64 tensor on the CPU or a CUDA device: the same update rule as the
default multi-tensor one, in another order of the same floating-point operations (after 20 Adam steps on a
ResNet-18's parameters the weights differed by at most 1.2e-7). On the project's 2-core CPU one Adam step over a
ResNet-18's 11.7 M parameters took 11.2 ms fused against 74.2 ms (one thread; SGD with momentum 8.5 against 13.9
ms; 2026-12-05), which was a tenth of a small CPU training run's time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamW": torch.optim.AdamW,
}
SCHEDULERS = ("onecycle", "cyclic", "exponential", "none")
#: schedulers stepped after every optimizer step; the others once per epoch
PER_STEP_SCHEDULERS = ("onecycle", "cyclic")
POOL_LR_MULTIPLIER = {"gem": 10.0, "gemmp": 100.0}
#: parameter groups the reference does not have, which keep their own peak under its shared max_lr
OWN_PEAK_GROUPS = ("proxies",)
#: where the fused optimizers run, and on which parameter types (PyTorch 2.4+)
FUSED_DEVICE_TYPES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.float64)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether PyTorch's fused optimizer step applies to every one of ``params`` (see the module's docstring)."""
    return bool(params) and all(p.device.type in FUSED_DEVICE_TYPES and p.dtype in FUSED_DTYPES for p in params)


def parameter_groups(network: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Split a network's trainable parameters into backbone / pooling / whitening groups."""
    pooling = str(getattr(network, "meta", {}).get("pooling", "gem"))
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "pool": [], "whiten": []}
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        head = name.split(".", 1)[0]
        groups["pool" if head == "pool" else "whiten" if head == "whiten" else "backbone"].append(param)
    result = [{"name": "backbone", "params": groups["backbone"], "lr": lr, "weight_decay": weight_decay}]
    if groups["pool"]:
        multiplier = POOL_LR_MULTIPLIER.get(pooling, 10.0)
        result.append({"name": "pool", "params": groups["pool"], "lr": lr * multiplier, "weight_decay": 0.0})
    if groups["whiten"]:
        result.append({"name": "whiten", "params": groups["whiten"], "lr": lr, "weight_decay": weight_decay})
    return [g for g in result if g["params"]]


def build_optimizer(
    network: nn.Module, name: str, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """``sgd`` (with momentum), ``adam`` or ``adamW`` over :func:`parameter_groups`, fused where
    :func:`fused_supported`. Parameters added later (:meth:`torch.optim.Optimizer.add_param_group`) must be of the
    same kind: a fused optimizer refuses others."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.")
    if lr <= 0:
        raise ValueError(f"The learning rate must be positive, got {lr}.")
    groups = parameter_groups(network, lr, weight_decay)
    fused = fused_supported([p for group in groups for p in group["params"]]) or None  # None: PyTorch's default
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    return OPTIMIZERS[name](groups, lr=lr, weight_decay=weight_decay, fused=fused)


def reference_schedule_lengths(epochs: int, epoch_size: int, batch_size: int, update_every: int) -> tuple[int, int]:
    """The reference's scheduler lengths, from the epoch's *image* count (not the steps actually taken).

    Returns ``(onecycle_total_steps, cyclic_step_size_up)``: OneCycle is built for
    ``epochs * ceil(epoch_size / batch_size / update_every)`` steps and CyclicLR's up phase is
    ``int(epochs * epoch_size / batch_size / update_every / 6)`` steps. When the last accumulation of an
    epoch is dropped, fewer steps are taken than OneCycle was built for, so its annealing stops short of
    the end, exactly as in the reference.
    """
    per_epoch = epoch_size / batch_size / update_every
    return epochs * math.ceil(per_epoch), int(epochs * per_epoch / 6)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    *,
    shared_max_lr: float | None = None,
    cycle_up_steps: int | None = None,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule; ``total_steps`` counts optimizer steps over the whole run.

    - ``onecycle``: from max lr / 10 (div factor 10) up to max lr and down, stepped per optimizer step;
    - ``cyclic``: triangular2 between max lr / 10 and max lr, the up phase ``cycle_up_steps`` (default one
      sixth of ``total_steps``), no momentum cycling;
    - ``exponential``: gamma = exp(-0.001), stepped per epoch;
    - ``none``: constant.

    ``shared_max_lr`` is the reference's way: one scalar ``max_lr`` for every parameter group, which
    overrides the per-group rates (GeM ``p`` then follows the same schedule as the backbone). Without it
    each group peaks at its own lr (``--group-lr-peaks``).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}.")
    if shared_max_lr is not None:
        # every group of the reference's network peaks at the one max_lr; a group that only our additions
        # have (the proxies of --loss normsoftmax) keeps its own rate
        max_lrs: list[float] | float = [
            group["lr"] if group.get("name") in OWN_PEAK_GROUPS else shared_max_lr for group in optimizer.param_groups
        ]
        base_lrs: list[float] | float = [lr / 10 for lr in max_lrs]
    else:
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        base_lrs = [lr / 10 for lr in max_lrs]
    if name == "onecycle":
        has_momentum = "betas" in optimizer.defaults or optimizer.defaults.get("momentum", 0) > 0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=max_lrs,
            total_steps=max(1, total_steps),
            div_factor=10.0,
            cycle_momentum=has_momentum,
        )
    if name == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer,
            base_lr=base_lrs,
            max_lr=max_lrs,
            step_size_up=max(1, cycle_up_steps if cycle_up_steps is not None else total_steps // 6),
            mode="triangular2",
            cycle_momentum=False,
        )
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-0.001))
    return None
