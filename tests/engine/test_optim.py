"""Parameter groups, optimizers and schedules (SPEC section 5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raml.engine.optim import build_optimizer, build_scheduler, parameter_groups


class Tiny(nn.Module):
    def __init__(self, pooling: str = "gem") -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.pool = nn.Module()
        self.pool.p = nn.Parameter(torch.ones(4 if pooling == "gemmp" else 1) * 3)
        self.whiten = nn.Linear(4, 2)
        self.meta = {"pooling": pooling}


@pytest.mark.parametrize(("pooling", "multiplier"), [("gem", 10.0), ("gemmp", 100.0)])
def test_groups_cover_every_parameter_once(pooling, multiplier):
    net = Tiny(pooling)
    groups = {g["name"]: g for g in parameter_groups(net, lr=1e-3, weight_decay=1e-6)}
    assert groups["pool"]["lr"] == pytest.approx(1e-3 * multiplier)
    assert groups["pool"]["weight_decay"] == 0.0
    assert groups["backbone"]["lr"] == groups["whiten"]["lr"] == 1e-3
    assert groups["backbone"]["weight_decay"] == groups["whiten"]["weight_decay"] == 1e-6
    seen = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters())


@pytest.mark.parametrize("name", ["sgd", "adam", "adamW"])
def test_optimizers(name):
    opt = build_optimizer(Tiny(), name, lr=1e-3, weight_decay=1e-6, momentum=0.9)
    assert len(opt.param_groups) == 3
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9


def test_bad_names_list_valid_ones():
    with pytest.raises(ValueError, match="adamW"):
        build_optimizer(Tiny(), "rmsprop", lr=1e-3)
    opt = build_optimizer(Tiny(), "adam", lr=1e-3)
    with pytest.raises(ValueError, match="onecycle"):
        build_scheduler(opt, "cosine", 10)


def _lrs(scheduler_name: str, steps: int, lr: float = 1e-3) -> list[float]:
    opt = build_optimizer(Tiny(), "adamW", lr=lr)
    scheduler = build_scheduler(opt, scheduler_name, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_onecycle_starts_at_a_tenth_and_peaks_at_lr():
    lrs = _lrs("onecycle", 100)
    assert lrs[0] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3)


def test_cyclic_triangular2_up_phase_is_a_sixth():
    lrs = _lrs("cyclic", 60)
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[10] == pytest.approx(1e-3)  # 60 // 6 = 10 steps up
    assert lrs[20] == pytest.approx(1e-4)
    assert lrs[30] == pytest.approx(1e-4 + (1e-3 - 1e-4) / 2)  # triangular2 halves the amplitude


def test_exponential_gamma():
    opt = build_optimizer(Tiny(), "adam", lr=1e-3)
    scheduler = build_scheduler(opt, "exponential", 10)
    for _ in range(5):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * math.exp(-0.005))
    assert build_scheduler(opt, "none", 10) is None


def test_reference_schedule_lengths_follow_the_image_count():
    from raml.engine.optim import reference_schedule_lengths

    # CUB train + val: 5,864 images, batch 8, 25 batches per step, 200 epochs
    assert reference_schedule_lengths(200, 5864, 8, 25) == (200 * 30, 977)
    # ... while 733 batches an epoch with the last incomplete accumulation dropped take 29 steps (docs/fidelity.md)
    assert math.ceil(5864 / 8) // 25 == 29
    # an exact multiple: no rounding up
    assert reference_schedule_lengths(2, 400, 8, 25) == (4, 0)


@pytest.mark.parametrize("name", ["onecycle", "cyclic"])
def test_shared_max_lr_overrides_every_groups_rate(name):
    # the reference: OneCycleLR/CyclicLR(max_lr=lr), one scalar, so GeM p follows the backbone's schedule
    lr = 1e-3
    opt = build_optimizer(Tiny(), "adamW", lr=lr)
    scheduler = build_scheduler(opt, name, 60, shared_max_lr=lr, cycle_up_steps=10)
    seen = []
    for _ in range(60):
        rates = [g["lr"] for g in opt.param_groups]
        assert max(rates) - min(rates) < 1e-15, rates  # every group, the pool's included, at the same rate
        seen.append(rates[0])
        opt.step()
        scheduler.step()
    assert seen[0] == pytest.approx(lr / 10)
    assert max(seen) == pytest.approx(lr, rel=1e-3)
    if name == "cyclic":
        assert seen[10] == pytest.approx(lr)  # the given up phase


def _peaks(opt: torch.optim.Optimizer, scheduler, steps: int) -> dict[str, float]:
    """The highest rate each named parameter group steps with over ``steps`` optimizer steps."""
    peaks = {g["name"]: 0.0 for g in opt.param_groups}
    for _ in range(steps):
        for g in opt.param_groups:
            peaks[g["name"]] = max(peaks[g["name"]], g["lr"])
        opt.step()
        scheduler.step()
    return peaks


def test_group_peaks_keep_the_pool_multiplier():
    opt = build_optimizer(Tiny(), "adamW", lr=1e-3)
    scheduler = build_scheduler(opt, "onecycle", 50)
    peaks = _peaks(opt, scheduler, 50)
    assert peaks["pool"] == pytest.approx(10 * peaks["backbone"])


def test_proxies_of_our_proxy_loss_keep_their_own_peak_under_the_shared_max_lr():
    opt = build_optimizer(Tiny(), "adamW", lr=1e-3)
    opt.add_param_group({"name": "proxies", "params": [nn.Parameter(torch.zeros(3, 2))], "lr": 1e-2})
    scheduler = build_scheduler(opt, "onecycle", 50, shared_max_lr=1e-3)
    peaks = _peaks(opt, scheduler, 50)
    assert peaks["backbone"] == pytest.approx(peaks["pool"]) == pytest.approx(peaks["whiten"])
    assert peaks["proxies"] == pytest.approx(10 * peaks["backbone"])
