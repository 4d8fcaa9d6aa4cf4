"""Tests written for the mutants of src/raml/losses that survived the losses' own tests (scripts/mutate.py losses;
docs/benchmarks.md "Mutation testing"): documented defaults, ties in D3still's hard/easy split, zero weights,
booleans refused as numbers, and errors that name the argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raml.losses import (
    absolute_loss,
    d3_loss,
    distillation_loss,
    distillation_loss_terms,
    normalized_softmax_loss,
    rkd_angle_loss,
    rkd_loss,
)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------------------------ D3still


def _d3_pairs_reference(student: torch.Tensor, teacher: torch.Tensor, k: int) -> tuple[float, float]:
    """Plain loops: (mean_i ||r_i on hard pairs||, mean_i ||r_i on easy pairs||), before the weights and 1/(k-1).

    Neighbours: the k - 1 most similar other images in the teacher's space (ties broken by index, as topk
    does on these inputs). A pair is hard when dC * dT < 0, easy when > 0, neither when either is 0."""
    n = student.shape[0]
    hard_norms, easy_norms = [], []
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(teacher[i] @ teacher[j]), j))
        neighbours = others[: k - 1]
        hard_sq, easy_sq = 0.0, 0.0
        for a in neighbours:
            for b in neighbours:
                d_t = float(teacher[i] @ teacher[b] - teacher[i] @ teacher[a])
                d_c = float(student[i] @ teacher[b] - student[i] @ teacher[a])
                r = (d_c - d_t) / (0.1 + abs(d_t))
                if d_c * d_t < 0:
                    hard_sq += r * r
                elif d_c * d_t > 0:
                    easy_sq += r * r
        hard_norms.append(hard_sq**0.5)
        easy_norms.append(easy_sq**0.5)
    return sum(hard_norms) / n, sum(easy_norms) / n


def test_d3_teacher_ties_are_neither_hard_nor_easy():
    """Images 1 and 2 are equally similar to image 0 for the teacher (dT = 0, exactly: 0.6 each) but not for
    the student (dC != 0): that pair must count in neither the hard nor the easy term."""
    teacher = torch.tensor(
        [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.6, 0.0, 0.8], [-1.0, 0.0, 0.0]], dtype=torch.float64
    )  # unit rows; t0 . t1 == t0 . t2 == 0.6
    student = F.normalize(teacher + torch.tensor([[0.0, 0.3, 0.0]], dtype=torch.float64), dim=1)
    k = 3
    hard, easy = _d3_pairs_reference(student, teacher, k)
    got = d3_loss(student, teacher, k=k, alpha=0.0, beta=1.0, gamma=1.0)
    assert float(got["hard"]) == pytest.approx(hard / (k - 1), rel=1e-9)
    assert float(got["easy"]) == pytest.approx(easy / (k - 1), rel=1e-9)
    # the tie is a real one: the student orders images 1 and 2 (its relative error there is not 0)
    assert float(student[0] @ teacher[1]) != pytest.approx(float(student[0] @ teacher[2]), abs=1e-3)


def test_d3_defaults_are_the_authors():
    student, teacher = _unit(12, 5, 2), _unit(12, 5, 3)
    default = d3_loss(student, teacher)
    explicit = d3_loss(student, teacher, k=10, alpha=100.0, beta=5.0, gamma=1.0)  # their CUB / ResNet-18 config
    for key in ("first_order", "hard", "easy", "total"):
        assert torch.equal(default[key], explicit[key]), key
    hard, easy = _d3_pairs_reference(student, teacher, 10)
    assert float(default["hard"]) == pytest.approx(5.0 * hard / 9, rel=1e-9)
    assert float(default["easy"]) == pytest.approx(1.0 * easy / 9, rel=1e-9)


def test_d3_weights_may_be_zero_but_not_negative_or_boolean():
    student, teacher = _unit(5, 3, 4), _unit(5, 3, 5)
    zero = d3_loss(student, teacher, k=3, alpha=0, beta=0, gamma=0)
    assert float(zero["total"]) == 0.0
    for name in ("alpha", "beta", "gamma"):
        with pytest.raises(ValueError, match=f"^{name} must be a number >= 0, got -1"):
            d3_loss(student, teacher, k=3, **{name: -1})
        with pytest.raises(ValueError, match=f"^{name} must be a number >= 0, got True"):
            d3_loss(student, teacher, k=3, **{name: True})


# ----------------------------------------------------------------------------------------------------- RKD


def test_rkd_defaults_and_zero_weights():
    student, teacher = _unit(6, 4, 6), _unit(6, 4, 7)
    default = rkd_loss(student, teacher)
    assert torch.equal(default["total"], 1.0 * default["distance"] + 2.0 * default["angle"])
    assert float(default["distance"]) > 0 and float(default["angle"]) > 0
    assert float(rkd_loss(student, teacher, distance_weight=0, angle_weight=0)["total"]) == 0.0
    for name in ("distance_weight", "angle_weight"):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            rkd_loss(student, teacher, **{name: -0.5})
        with pytest.raises(ValueError, match=f"^{name} must be"):
            rkd_loss(student, teacher, **{name: True})


def test_rkd_angle_needs_three_embeddings_and_three_are_enough():
    student, teacher = _unit(3, 4, 8), _unit(3, 4, 9)
    assert torch.isfinite(rkd_angle_loss(student, teacher)) and float(rkd_angle_loss(student, teacher)) > 0
    with pytest.raises(ValueError, match="at least 3 embeddings"):
        rkd_angle_loss(student[:2], teacher[:2])


# ------------------------------------------------------------------------------------- the paper's loss


def test_distillation_default_eps_is_one_in_a_million():
    student = F.normalize(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64), dim=2)
    teacher = F.normalize(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64), dim=2)
    for key, value in distillation_loss_terms(student, teacher, 0.7, 0.3).items():
        assert torch.equal(value, distillation_loss_terms(student, teacher, 0.7, 0.3, eps=1e-6)[key]), key
    assert torch.equal(
        distillation_loss(student, teacher, 0.7, 0.3), distillation_loss(student, teacher, 0.7, 0.3, 1e-6)
    )
    # the absolute term of identical embeddings is eps^2 per pair: the default eps shows in the value
    same = absolute_loss(student[:, 0], student[:, 0])
    assert float(same) == pytest.approx(2 * 1e-12, rel=1e-6)


def test_distillation_arguments_are_checked_by_name():
    student = F.normalize(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(12)), dim=2)
    with pytest.raises(ValueError, match="lam_1"):
        distillation_loss_terms(student, student, True, 0.5)
    with pytest.raises(ValueError, match="eps"):
        distillation_loss_terms(student, student, 0.5, 0.5, eps=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        absolute_loss(student[:, 0], student[:, 0], eps=float("inf"))
    with pytest.raises(TypeError, match=r"^student must be a torch.Tensor of shape \(B, P, D\), got list"):
        distillation_loss_terms([[0.0]], student, 0.5, 0.5)
    with pytest.raises(TypeError, match=r"^teacher must be a torch.Tensor of shape \(B, D\), got list"):
        absolute_loss(student[:, 0], [[0.0]])
    with pytest.raises(ValueError, match="dimensions match"):
        absolute_loss(student[:, 0], torch.zeros(2, 5))


# ---------------------------------------------------------------------------------- normalised softmax


def test_normalized_softmax_checks_its_inputs():
    embeddings, proxies = _unit(4, 3, 13).float(), _unit(5, 3, 14).float()
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(normalized_softmax_loss(embeddings, labels, proxies))
    with pytest.raises(ValueError):
        normalized_softmax_loss(embeddings[0], labels, proxies)  # 1-D embeddings
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        normalized_softmax_loss(embeddings, labels, proxies, temperature=0.0)
    with pytest.raises(ValueError, match=r"one label per embedding, got \(3,\) for 4"):
        normalized_softmax_loss(embeddings, labels[:3], proxies)


# ------------------------------------------------------------------------------------------- AML and CSD


def test_aml_default_margin_and_checked_arguments():
    from raml.losses import aml_contrastive_loss

    student, teacher = _unit(5, 3, 15), _unit(5, 3, 16)
    assert torch.equal(aml_contrastive_loss(student, teacher), aml_contrastive_loss(student, teacher, margin=0.7))
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="^margin"):
            aml_contrastive_loss(student, teacher, margin=bad)
    with pytest.raises(ValueError, match="^student must be a floating-point"):
        aml_contrastive_loss(student.long(), teacher)
    with pytest.raises(ValueError, match="^teacher must be a floating-point .* got list"):
        aml_contrastive_loss(student, [[0.0]])
    with pytest.raises(ValueError, match="A batch of 1 embeddings has no pairs"):
        aml_contrastive_loss(student[:1], teacher[:1])


def test_csd_defaults():
    from raml.losses import csd_loss

    student, teacher = _unit(8, 4, 17), _unit(8, 4, 18)
    default = csd_loss(student, teacher, 4)
    explicit = csd_loss(student, teacher, 4, temperature=0.1, first_order_weight=1.0)
    if isinstance(default, dict):
        assert all(torch.equal(default[key], explicit[key]) for key in default)
    else:
        assert torch.equal(default, explicit)


# ------------------------------------------------------------------------------------------ csd, rop, ugd arguments
def _pair(n: int = 6, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_csd_and_rop_name_their_bad_temperature_and_weights_word_for_word() -> None:
    from raml.losses import csd_loss, rop_loss

    s, t = _pair()
    for loss in (csd_loss, rop_loss):
        with pytest.raises(ValueError) as error:
            loss(s, t, 3, temperature=0.0)
        assert str(error.value) == "temperature must be a positive finite number, got 0.0."
    with pytest.raises(ValueError) as error:
        csd_loss(s, t, 3, first_order_weight=-1.0)
    assert str(error.value) == "first_order_weight must be a number >= 0, got -1.0."
    with pytest.raises(ValueError, match=r"^first_order_weight must be a number >= 0, got True\.$"):
        csd_loss(s, t, 3, first_order_weight=True)
    with pytest.raises(ValueError, match=r"^rank_weight must be a number >= 0, got True\.$"):
        rop_loss(s, t, 3, rank_weight=True)


def test_ugd_loss_checks_each_weight_and_each_region_shape_on_its_own() -> None:
    from raml.losses import ugd_loss

    n, d = 2, 2  # n = d, so that a 4-d region tensor (n, R, n, d) has shape[::2] == (n, d)
    s, t = _pair(n, d)
    regions = torch.randn(n, 3, d)
    mask = torch.ones(n, 3, dtype=torch.bool)
    assert torch.isfinite(ugd_loss(s, t, [regions], [regions.clone()], [mask])["total"])
    for name in ("alpha", "beta"):
        with pytest.raises(ValueError) as error:
            ugd_loss(s, t, [regions], [regions], [mask], **{name: -1.0})
        assert str(error.value) == f"{name} must be a number >= 0, got -1.0."
        with pytest.raises(ValueError, match=f"^{name} must be a number >= 0, got True.$"):
            ugd_loss(s, t, [regions], [regions], [mask], **{name: True})
    four_d = torch.randn(n, 3, n, d)
    other_count = torch.randn(n, 4, d)
    for student_regions, teacher_regions in ((four_d, four_d.clone()), (regions, other_count)):
        with pytest.raises(ValueError, match="^granularity 0: student and teacher regions must be"):
            ugd_loss(s, t, [student_regions], [teacher_regions], [mask])
    with pytest.raises(ValueError) as error:
        ugd_loss(s, t, [regions], [regions], [mask.float()])
    assert str(error.value) == "granularity 0: the mask must be bool (2, 3), got torch.float32 (2, 3)."


def test_rkd_loss_passes_the_groups_to_both_terms() -> None:
    from raml.losses.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss

    s, t = _pair(6, 4)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    got = rkd_loss(s, t, 1.0, 1.0, groups)
    assert torch.equal(got["distance"], rkd_distance_loss(s, t, groups))
    assert torch.equal(got["angle"], rkd_angle_loss(s, t, groups))
    assert not torch.allclose(got["distance"], rkd_distance_loss(s, t))
    assert not torch.allclose(got["angle"], rkd_angle_loss(s, t))
    with pytest.raises(ValueError) as error:
        rkd_distance_loss(s, t, torch.zeros(6, dtype=torch.long))
    assert str(error.value) == "The distance-wise term needs two rows of different groups; every row is of one group."


def test_triplet_loss_without_positives_is_zero_and_one_valid_pair_is_not_halved() -> None:
    from raml.losses import triplet_loss

    g = torch.Generator().manual_seed(3)
    anchor = F.normalize(torch.randn(2, 4, generator=g), dim=1)
    positives = F.normalize(torch.randn(2, 1, 4, generator=g), dim=2)
    negatives = F.normalize(torch.randn(2, 1, 4, generator=g), dim=2)
    assert triplet_loss(anchor, positives[:, :0], negatives, 0.5).item() == 0.0  # no positives, some negatives
    # one (positive, negative) pair per anchor: the sum of the hinges on squared distances; with masks (all kept),
    # each anchor's mean over its one valid pair is that hinge, not half of it
    d_pos = (anchor - positives[:, 0]).pow(2).sum(dim=1)
    d_neg = (anchor - negatives[:, 0]).pow(2).sum(dim=1)
    expected = (d_pos - d_neg + 5.0).clamp(min=0).sum()
    assert expected.item() > 0
    assert triplet_loss(anchor, positives, negatives, 5.0).item() == pytest.approx(expected.item(), rel=1e-5)
    keep = torch.ones(2, 1, dtype=torch.bool)
    masked = triplet_loss(anchor, positives, negatives, 5.0, positive_mask=keep, negative_mask=keep)
    assert masked.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(anchor, positives, negatives, True)


def test_top_k_refuses_a_boolean_k_and_distillation_names_its_bad_arguments() -> None:
    from raml.losses import absolute_loss, distillation_loss_terms
    from raml.losses.aml import top_k_exclusions

    with pytest.raises(ValueError, match="^k must be an integer"):
        top_k_exclusions(True, None, 6, torch.device("cpu"))
    s = F.normalize(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), dim=2)
    with pytest.raises(ValueError, match=r"^lam_1 must be a finite number, got nan\.$"):
        distillation_loss_terms(s, s, float("nan"), 1.0)
    with pytest.raises(ValueError, match=r"^eps must be a finite number, got inf\.$"):
        distillation_loss_terms(s, s, 1.0, 1.0, eps=float("inf"))
    with pytest.raises(ValueError, match=r"^eps must be a finite number, got inf\.$"):
        absolute_loss(s[0], s[0], eps=float("inf"))
    with pytest.raises(ValueError, match=r"make the output dimensions match \(same whitening\)\.$"):
        distillation_loss_terms(s, s[..., :3], 1.0, 1.0)
