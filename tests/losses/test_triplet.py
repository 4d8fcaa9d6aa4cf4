"""Triplet loss against a slow explicit loop over anchors and (positive, negative) pairs."""

from __future__ import annotations

import pytest
import torch

from raml.losses import triplet_loss


def _normalised(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def _sq_dist(u: torch.Tensor, v: torch.Tensor) -> float:
    return sum((float(a) - float(b)) ** 2 for a, b in zip(u.tolist(), v.tolist(), strict=True))


def _slow(anchor, positives, negatives, margin, pmask=None, nmask=None):
    total = 0.0
    for b in range(anchor.shape[0]):
        hinges = []
        for p in range(positives.shape[1]):
            if pmask is not None and not pmask[b, p]:
                continue
            for n in range(negatives.shape[1]):
                if nmask is not None and not nmask[b, n]:
                    continue
                d_ap = _sq_dist(anchor[b], positives[b, p])
                d_an = _sq_dist(anchor[b], negatives[b, n])
                hinges.append(max(0.0, d_ap - d_an + margin))
        if hinges:
            total += sum(hinges) / len(hinges)
    return total


@pytest.mark.parametrize(("batch", "num_pos", "num_neg", "dim"), [(4, 3, 5, 6), (1, 1, 1, 2), (3, 2, 4, 3)])
@pytest.mark.parametrize("margin", [0.0, 0.7, 2.5])
def test_matches_slow_loop(batch, num_pos, num_neg, dim, margin):
    a = _normalised(batch, dim, seed=1)
    p = _normalised(batch, num_pos, dim, seed=2)
    n = _normalised(batch, num_neg, dim, seed=3)
    assert abs(triplet_loss(a, p, n, margin).item() - _slow(a, p, n, margin)) < 1e-10


def test_masks_match_slow_loop_and_exclude_padding():
    a, p, n = _normalised(4, 5, seed=4), _normalised(4, 3, 5, seed=5), _normalised(4, 6, 5, seed=6)
    g = torch.Generator().manual_seed(7)
    pmask = torch.rand(4, 3, generator=g) > 0.3
    nmask = torch.rand(4, 6, generator=g) > 0.3
    pmask[0] = False  # anchor 0: no valid positive -> contributes 0
    nmask[1, :] = False  # anchor 1: no valid negative -> contributes 0
    pmask[2, 0] = nmask[2, 0] = True
    expected = _slow(a, p, n, 0.7, pmask, nmask)
    assert abs(triplet_loss(a, p, n, 0.7, pmask, nmask).item() - expected) < 1e-10
    # Only one mask given.
    assert abs(triplet_loss(a, p, n, 0.7, positive_mask=pmask).item() - _slow(a, p, n, 0.7, pmask)) < 1e-10
    only_neg = triplet_loss(a, p, n, 0.7, negative_mask=nmask).item()
    assert abs(only_neg - _slow(a, p, n, 0.7, None, nmask)) < 1e-10
    # Garbage (even NaN) in padded slots changes neither value nor gradient.
    p_pad, n_pad = p.clone(), n.clone()
    p_pad[~pmask] = float("nan")
    n_pad[~nmask] = float("inf")
    a_grad = a.clone().requires_grad_(True)
    loss = triplet_loss(a_grad, p_pad, n_pad, 0.7, pmask, nmask)
    assert abs(loss.item() - expected) < 1e-10
    loss.backward()
    assert torch.isfinite(a_grad.grad).all()


def test_all_masked_is_zero():
    a, p, n = _normalised(2, 3), _normalised(2, 2, 3), _normalised(2, 2, 3)
    loss = triplet_loss(a, p, n, 0.7, torch.zeros(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0


def test_gradients_and_gradcheck():
    a = _normalised(3, 4, seed=8).requires_grad_(True)
    p = _normalised(3, 2, 4, seed=9).requires_grad_(True)
    n = _normalised(3, 3, 4, seed=10).requires_grad_(True)
    triplet_loss(a, p, n, 1.5).backward()
    assert a.grad.abs().sum() > 0 and p.grad.abs().sum() > 0 and n.grad.abs().sum() > 0
    # Large margin keeps every hinge active, away from the kink where gradcheck is ill-defined.
    assert torch.autograd.gradcheck(lambda x, y, z: triplet_loss(x, y, z, 5.0), (a, p, n))
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    assert torch.autograd.gradcheck(lambda x, y, z: triplet_loss(x, y, z, 5.0, mask), (a, p, n))


@pytest.mark.parametrize(
    ("a_shape", "p_shape", "n_shape", "match"),
    [
        ((2, 4, 1), (2, 3, 4), (2, 3, 4), r"anchor must have shape \(B, D\)"),
        ((2, 4), (2, 4), (2, 3, 4), r"positives must have shape \(B, P, D\)"),
        ((2, 4), (2, 3, 4), (2, 3), r"negatives must have shape \(B, N, D\)"),
        ((2, 4), (3, 3, 4), (2, 3, 4), "positives has shape"),
        ((2, 4), (2, 3, 4), (2, 3, 5), "negatives has shape"),
    ],
)
def test_shape_errors(a_shape, p_shape, n_shape, match):
    with pytest.raises(ValueError, match=match):
        triplet_loss(torch.zeros(a_shape), torch.zeros(p_shape), torch.zeros(n_shape), 0.7)


def test_bad_masks_and_margin():
    a, p, n = torch.zeros(2, 4), torch.zeros(2, 3, 4), torch.zeros(2, 5, 4)
    with pytest.raises(TypeError, match="bool tensor"):
        triplet_loss(a, p, n, 0.7, positive_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"negative_mask must have shape \(B, N\)"):
        triplet_loss(a, p, n, 0.7, negative_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        triplet_loss(a, p, n, -0.1)
    with pytest.raises(ValueError, match="finite"):
        triplet_loss(a, p, n, float("inf"))
    with pytest.raises(TypeError, match="floating-point"):
        triplet_loss(a.long(), p, n, 0.7)


def test_normalized_softmax_loss_matches_an_explicit_loop():
    import math

    import torch.nn.functional as F

    from raml.losses import normalized_softmax_loss

    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    proxies = torch.randn(3, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    expected = 0.0
    for i in range(5):
        logits = []
        for c in range(3):
            p = proxies[c] / proxies[c].norm()
            logits.append(float(emb[i] @ p) / 0.1)
        expected += -(logits[labels[i]] - math.log(sum(math.exp(v) for v in logits)))
    got = normalized_softmax_loss(emb, labels, proxies, temperature=0.1)
    assert abs(got.item() - expected) < 1e-10
    with pytest.raises(ValueError, match="same D"):
        normalized_softmax_loss(emb, labels, proxies[:, :3])
