"""Which network, size, scales and device feed each side of the test protocol (spy networks record them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from raml.data.splits import get_split
from raml.retrieval.evaluate import default_ks, evaluate_split

CPU = torch.device("cpu")
QR, DR = 32, 48


class Spy(nn.Module):
    """Records (input shape, device) of every call; embeds by a fixed random projection of channel means.

    On the ``meta`` device (which holds no numbers) it returns a deterministic CPU embedding so that the
    protocol can run to the end while the spy proves which device the images were sent to.
    """

    def __init__(self, seed: int, dim: int = 6) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(3 * 4, dim, generator=generator)
        self.meta = {"outputdim": dim, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "pooling": "mac"}
        self.calls: list[tuple[tuple[int, ...], str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), x.device.type))
        if x.device.type == "meta":
            out = torch.arange(x.shape[0] * self.meta["outputdim"], dtype=torch.float32).view(x.shape[0], -1)
            return (out.sin() + 1.5) / 10
        pooled = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        out = pooled @ self.projection.to(x.device)
        return out / out.norm(dim=1, keepdim=True)

    def sizes(self) -> set[tuple[int, int]]:
        return {shape[-2:] for shape, _ in self.calls}

    def devices(self) -> set[str]:
        return {device for _, device in self.calls}

    def images_seen(self) -> int:
        return sum(shape[0] for shape, _ in self.calls)


@pytest.fixture
def split(sop_root: Path):
    return get_split("sop-test", sop_root)  # 6 classes, 18 images


def test_asymmetric_queries_student_at_qr_database_teacher_at_dr(split) -> None:
    student, teacher = Spy(0), Spy(1)
    evaluate_split(student, split, QR, CPU, teacher=teacher, teacher_image_size=DR, progress=False, batch_size=8)
    assert student.sizes() == {(QR, QR)} and student.images_seen() == len(split)
    assert teacher.sizes() == {(DR, DR)} and teacher.images_seen() == len(split)


def test_symmetric_is_the_student_at_qr_on_both_sides(split) -> None:
    student = Spy(0)
    results = evaluate_split(student, split, QR, CPU, sym=True, progress=False, batch_size=8)
    # one extraction, used as queries and as database
    assert student.sizes() == {(QR, QR)} and student.images_seen() == len(split)
    assert set(results) == {"sym"}


def test_teacher_runs_on_the_teacher_device(split) -> None:
    student, teacher = Spy(0), Spy(1)
    results = evaluate_split(
        student,
        split,
        QR,
        CPU,
        teacher=teacher,
        teacher_image_size=DR,
        sym=True,
        progress=False,
        teacher_device=torch.device("meta"),
    )
    assert student.devices() == {"cpu"} and teacher.devices() == {"meta"}
    assert set(results) == {"asym", "sym"}
    # default: the teacher shares the student's device
    student, teacher = Spy(0), Spy(1)
    evaluate_split(student, split, QR, CPU, teacher=teacher, teacher_image_size=DR, progress=False)
    assert teacher.devices() == {"cpu"}


def test_multiscale_queries_single_scale_database(split) -> None:
    student, teacher = Spy(0), Spy(1)
    scales = (1.0, 0.5, 1.5)
    results = evaluate_split(
        student,
        split,
        QR,
        CPU,
        teacher=teacher,
        teacher_image_size=DR,
        sym=True,
        progress=False,
        query_scales=scales,
    )
    assert student.sizes() == {(QR, QR), (QR // 2, QR // 2), (48, 48)}
    assert student.images_seen() == len(split) * len(scales)
    assert teacher.sizes() == {(DR, DR)} and teacher.images_seen() == len(split)
    assert set(results) == {"asym", "sym"}


def test_default_recall_ks_include_the_reference_k() -> None:
    assert default_ks("cub-test") == (1, 2, 4, 8)
    assert default_ks("cars-test") == (1, 2, 4, 8)
    assert default_ks("mine-test") == (1, 2, 4, 8)
    assert default_ks("sop-test") == (1, 4, 8, 10, 100, 1000)
    for name in ("cub-test", "cars-val", "sop-test", "sop"):
        assert {1, 4, 8} <= set(default_ks(name))  # the reference's compute_map_and_print kappas


def test_sop_reports_the_reference_and_paper_recalls(split) -> None:
    results = evaluate_split(Spy(0), split, QR, CPU, sym=True, progress=False)
    recalls = [key for key in results["sym"] if key.startswith("R@")]
    assert recalls == ["R@1", "R@4", "R@8", "R@10", "R@100", "R@1000"]


def test_bad_scales_are_refused_before_any_extraction(split) -> None:
    student = Spy(0)
    with pytest.raises(ValueError, match="positive finite"):
        evaluate_split(student, split, QR, CPU, sym=True, progress=False, query_scales=(1.0, 0.0))
    assert student.calls == []


def test_asymmetric_metrics_leave_each_query_s_own_image_out(split, plain_metrics) -> None:
    """The query image is in the database too (the teacher's embedding of the same file): it is junk, not the
    first positive. With the student's queries equal to the teacher's embeddings, counting it would give R@1 =
    100; the metrics must be those of a loop over the other images."""
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.nn.functional.normalize(torch.randn(len(split), 4, generator=generator), dim=1)
    student, teacher = Spy(0, dim=4), Spy(1, dim=4)

    def embed(network, paths, *args, **kwargs):
        assert len(paths) == len(split)
        return embeddings.clone()

    ks = (1, 2, 4)
    results = evaluate_split(student, split, QR, CPU, teacher=teacher, progress=False, ks=ks, embed=embed)
    labels = list(split.labels)
    expected = plain_metrics((embeddings @ embeddings.T).numpy(), labels, labels, ks, exclude_self=True)
    assert expected["R@1"] < 100
    assert results["asym"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    for k in ks:
        assert results["asym"][f"R@{k}"] == pytest.approx(expected[f"R@{k}"], abs=1e-6)
