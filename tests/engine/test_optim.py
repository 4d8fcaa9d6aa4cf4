"""Parameter groups, optimizers and schedules (SPEC section 5)."""

from __future__ import annotations

import io
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


def _one_cycle(step: int, total: int, low: float, high: float) -> float:
    """PyTorch's OneCycleLR curve as its documentation defines it (pct_start 0.3, cosine annealing): from ``low``
    to ``high`` over steps 0 .. 0.3 * total - 1, then from ``high`` to ``low`` over the rest."""
    peak = 0.3 * total - 1
    if step <= peak:
        start, end, pct = low, high, step / peak
    else:
        start, end, pct = high, low, (step - peak) / (total - 1 - peak)
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


@pytest.mark.parametrize(("optimizer", "key"), [("adamW", "betas"), ("sgd", "momentum")])
def test_onecycle_follows_the_curve_and_cycles_momentum_against_the_rate(optimizer, key):
    """The rate from lr / 10 up to lr and down to lr / 10^5 (final div factor 10^4), and the momentum (Adam's
    beta1, SGD's momentum) from 0.95 down to 0.85 and back, as in the reference's OneCycleLR with its defaults."""
    total, lr = 100, 1e-3
    opt = build_optimizer(Tiny(), optimizer, lr=lr, momentum=0.9)
    scheduler = build_scheduler(opt, "onecycle", total)
    for step in range(total):
        group = opt.param_groups[0]
        momentum = group["betas"][0] if key == "betas" else group["momentum"]
        assert group["lr"] == pytest.approx(_one_cycle(step, total, lr / 10, lr) if step <= 29 else
                                            _one_cycle(step, total, lr / 10 / 1e4, lr), rel=1e-9), step  # fmt: skip
        assert momentum == pytest.approx(_one_cycle(step, total, 0.95, 0.85), rel=1e-9), step
        opt.step()
        scheduler.step()


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


def _hand_step(name: str, param: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float) -> torch.Tensor:
    """The textbook update rules, written out in float64: Adam (L2 added to the gradient), AdamW (decoupled decay),
    SGD with momentum 0.9 (decay added to the gradient); PyTorch's defaults betas (0.9, 0.999), eps 1e-8."""
    w = param.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        if name == "sgd":
            g = g + wd * w
            m = g if t == 1 else 0.9 * m + g
            w = w - lr * m
            continue
        if name == "adamW":
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        w = w - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return w


@pytest.mark.parametrize("name", ["sgd", "adam", "adamW"])
def test_cpu_float_parameters_take_the_fused_step_and_it_is_the_textbook_rule(name):
    net = Tiny()
    opt = build_optimizer(net, name, lr=1e-2, weight_decay=1e-2, momentum=0.9)
    assert opt.defaults["fused"] is True
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    grads = {n: [torch.randn(p.shape, generator=generator) for _ in range(5)] for n, p in net.named_parameters()}
    for step in range(5):
        for n, p in net.named_parameters():
            p.grad = grads[n][step].clone()
        opt.step()
    rates = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    for n, p in net.named_parameters():
        lr, wd = rates[id(p)]
        expected = _hand_step(name, start[n], grads[n], lr, wd)
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6, msg=n)


def test_half_precision_parameters_keep_pytorchs_default_step():
    opt = build_optimizer(Tiny().half(), "adam", lr=1e-3)
    assert not opt.defaults["fused"]


def test_a_state_saved_by_the_unfused_optimizer_resumes_in_the_fused_one():
    # checkpoints written before the fused step (and the reference's) hold a multi-tensor Adam's state
    torch.manual_seed(0)
    old, new = Tiny(), Tiny()
    new.load_state_dict(old.state_dict())
    unfused = torch.optim.Adam(parameter_groups(old, 1e-2, 0.0), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=generator) for p in old.parameters()] for _ in range(6)]
    for step in range(3):
        for p, g in zip(old.parameters(), grads[step]):
            p.grad = g.clone()
        unfused.step()
    new.load_state_dict(old.state_dict())
    fused = build_optimizer(new, "adam", lr=1e-2, weight_decay=0.0)
    assert fused.defaults["fused"] is True and not unfused.defaults["fused"]
    saved = io.BytesIO()  # through a file, as from a checkpoint (loading shares the tensors of a live state)
    torch.save(unfused.state_dict(), saved)
    saved.seek(0)
    fused.load_state_dict(torch.load(saved))
    for step in range(3, 6):
        for p, q, g in zip(old.parameters(), new.parameters(), grads[step]):
            p.grad, q.grad = g.clone(), g.clone()
        unfused.step()
        fused.step()
    for p, q in zip(old.parameters(), new.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_the_optimizer_defaults_are_the_references():
    """weight decay 1e-6 on the decayed group and SGD momentum 0.9 when not given (the reference's defaults)."""
    sgd = build_optimizer(Tiny(), "sgd", lr=1e-3)
    assert sgd.defaults["momentum"] == 0.9
    adam = build_optimizer(Tiny(), "adamW", lr=1e-3)
    for opt in (sgd, adam):
        assert max(group["weight_decay"] for group in opt.param_groups) == 1e-6
