"""Pooling layers against closed forms computed with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raml.models.pooling import MAC, POOLINGS, GeM, GeMmp, SPoC, build_pooling


def _feature_map(seed: int = 0, shape: tuple[int, int, int, int] = (2, 3, 4, 5)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Include negatives and exact zeros so the clamp matters.
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    x[0, 0, 0, 0] = 0.0
    return x


def _loop_pool(x: torch.Tensor, reduce) -> np.ndarray:
    a = x.detach().numpy()
    batch, channels, height, width = a.shape
    out = np.zeros((batch, channels))
    for b in range(batch):
        for c in range(channels):
            values = [float(a[b, c, i, j]) for i in range(height) for j in range(width)]
            out[b, c] = reduce(values, c)
    return out


def _gem_closed_form(values: list[float], p: float, eps: float) -> float:
    return (sum(max(v, eps) ** p for v in values) / len(values)) ** (1.0 / p)


def test_gem_matches_loop() -> None:
    x = _feature_map()
    pool = GeM(p=2.5, eps=1e-6).double()
    expected = _loop_pool(x, lambda values, c: _gem_closed_form(values, 2.5, 1e-6))
    np.testing.assert_allclose(pool(x).detach().numpy(), expected, rtol=1e-10)
    assert pool.p.shape == (1,)
    assert list(pool.state_dict()) == ["p"]


def test_gem_default_p_is_three() -> None:
    pool = GeM()
    assert pool.p.item() == 3.0 and pool.eps == 1e-6


def test_gemmp_default_p_is_three_for_every_channel() -> None:
    pool = GeMmp(4)
    assert pool.p.tolist() == [3.0, 3.0, 3.0, 3.0] and pool.eps == 1e-6


def test_gemmp_matches_loop() -> None:
    x = _feature_map(1)
    pool = GeMmp(channels=3).double()
    with torch.no_grad():
        pool.p.copy_(torch.tensor([1.5, 3.0, 4.5], dtype=torch.float64))
    ps = [1.5, 3.0, 4.5]
    expected = _loop_pool(x, lambda values, c: _gem_closed_form(values, ps[c], 1e-6))
    np.testing.assert_allclose(pool(x).detach().numpy(), expected, rtol=1e-10)
    assert pool.p.shape == (3,)


def test_mac_and_spoc_match_loop() -> None:
    x = _feature_map(2)
    np.testing.assert_allclose(MAC()(x).numpy(), _loop_pool(x, lambda values, c: max(values)))
    np.testing.assert_allclose(
        SPoC()(x).numpy(), _loop_pool(x, lambda values, c: sum(values) / len(values)), rtol=1e-12
    )


def test_gem_p1_is_average_of_clamped() -> None:
    x = _feature_map(3).abs() + 0.1
    pool = GeM(p=1.0).double()
    torch.testing.assert_close(pool(x), x.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["gem", "gemmp"])
def test_gradients_reach_p(name: str) -> None:
    pool = build_pooling(name, channels=3)
    x = _feature_map(4).float().abs()
    pool(x).sum().backward()
    assert pool.p.grad is not None
    assert torch.isfinite(pool.p.grad).all() and pool.p.grad.abs().sum() > 0


def test_registry_builds_every_name() -> None:
    x = torch.rand(2, 8, 3, 3)
    for name in POOLINGS:
        out = build_pooling(name, channels=8)(x)
        assert out.shape == (2, 8)
    assert isinstance(build_pooling("GeM", 8), GeM)


@pytest.mark.parametrize("name", ["rmac", "no_pool", "avg", ""])
def test_unknown_pooling_lists_valid_names(name: str) -> None:
    with pytest.raises(ValueError, match="valid poolings are: gem, gemmp, mac, spoc"):
        build_pooling(name, channels=8)


@pytest.mark.parametrize("pool", [GeM(), GeMmp(4), MAC(), SPoC()])
def test_pooling_rejects_non_map_input(pool: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        pool(torch.rand(2, 4))


def test_gemmp_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="built for 4 channels but got a feature map with 5"):
        GeMmp(4)(torch.rand(1, 5, 2, 2))


@pytest.mark.parametrize("factory", [lambda: GeM(p=0.0), lambda: GeMmp(3, p=-1.0), lambda: GeMmp(0)])
def test_bad_constructor_arguments(factory) -> None:
    with pytest.raises(ValueError, match="positive"):
        factory()


def test_gem_large_p_approaches_max() -> None:
    x = torch.rand(1, 2, 3, 3, dtype=torch.float64) + 0.5
    out = GeM(p=200.0).double()(x)
    assert math.isclose(out[0, 0].item(), x[0, 0].max().item(), rel_tol=2e-2)


@pytest.mark.parametrize("pool", [GeM(p=3.0, eps=1e-6), GeMmp(channels=2, p=3.0, eps=1e-6)])
def test_gem_of_a_channel_with_no_positive_value_is_eps(pool: torch.nn.Module) -> None:
    """The clamp is at eps, not 0: a channel of zeros and negatives pools to ``(mean eps**p) ** (1/p) = eps``
    (the closed form); a clamp at 0 gives 0. The closed-form test's eps effect is below its tolerance."""
    x = torch.tensor([[[[0.0, -1.0], [-2.0, -0.5]], [[4.0, 0.0], [-3.0, 2.0]]]], dtype=torch.float64)
    out = pool.double()(x).detach().numpy()
    assert out[0, 0] == pytest.approx(1e-6, rel=1e-9)
    assert out[0, 1] == pytest.approx(_gem_closed_form([4.0, 0.0, -3.0, 2.0], 3.0, 1e-6), rel=1e-12)
