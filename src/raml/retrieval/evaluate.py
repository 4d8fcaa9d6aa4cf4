"""The paper's test protocol on a dataset split (SPEC section 4).

Every image of the split is a query against all images of the split; the query itself is junk and the
other images of its class are the positives.

- asymmetric: queries embedded by the student at QR (multi-scale when asked), database by the teacher at DR
  (always single-scale), each network on its own device;
- symmetric: the student's query embeddings on both sides.

Returns percentages: ``{"asym": {"mAP": .., "R@1": .., ...}, "sym": {...}}`` (keys present for the tests run).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from raml.data.image_limits import DEFAULT_MAX_PIXELS
from raml.data.splits import Split
from raml.retrieval.cache import EmbeddingCache
from raml.retrieval.extract import SINGLE_SCALE, extract_embeddings, validate_scales
from raml.retrieval.metrics import retrieval_metrics
from raml.retrieval.scales import check_scaled_size

logger = logging.getLogger(__name__)

#: Recall@k reported per dataset family: the reference's own printout (k = 1, 4, 8) merged with the k of the
#: paper's tables (SPEC section 4: 1, 2, 4, 8 for CUB/Cars, 1, 10, 100, 1000 for SOP). Other datasets use the
#: CUB/Cars set.
RECALL_KS: dict[str, tuple[int, ...]] = {"sop": (1, 4, 8, 10, 100, 1000)}
DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)


def default_ks(split_name: str) -> tuple[int, ...]:
    """The Recall@k values reported for a split such as ``sop-test`` or ``cub-test``."""
    base = split_name.split("-")[0].lower()
    return RECALL_KS.get(base, DEFAULT_KS)


def output_dim(network: nn.Module) -> int:
    """The embedding dimension recorded in a network's metadata."""
    meta = getattr(network, "meta", None) or {}
    if "outputdim" in meta:
        return int(meta["outputdim"])
    return int(network.output_dim)  # type: ignore[attr-defined]


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a student/teacher pair whose embeddings cannot be compared, before any extraction."""
    student_dim, teacher_dim = output_dim(student), output_dim(teacher)
    if student_dim != teacher_dim:
        raise ValueError(
            f"The student embeds into {student_dim} dimensions but the teacher into {teacher_dim}: "
            "asymmetric retrieval needs both in the same space. Use a student trained (distilled) for "
            "this teacher, or the same --whitening dimension as the teacher."
        )


def evaluate_split(
    student: nn.Module,
    split: Split,
    image_size: int,
    device: torch.device,
    teacher: nn.Module | None = None,
    teacher_image_size: int | None = None,
    sym: bool = False,
    batch_size: int = 32,
    workers: int = 0,
    ks: Sequence[int] | None = None,
    cache: EmbeddingCache | None = None,
    teacher_sha256: str | None = None,
    progress: bool = True,
    embed: Callable[..., torch.Tensor] | None = None,
    teacher_device: torch.device | None = None,
    query_scales: Sequence[float] = SINGLE_SCALE,
    content_hash: bool = False,
    precision: str = "fp32",
) -> dict[str, dict[str, float]]:
    """Run the asymmetric (when a teacher is given) and/or symmetric test on ``split``.

    Args:
        student: query network, on ``device``.
        split: the test split (e.g. ``cub-test``).
        image_size: query resolution QR.
        device: where the student runs.
        teacher: database network for the asymmetric test, on ``teacher_device``; None skips that test.
        teacher_image_size: database resolution DR (defaults to ``image_size``).
        sym: also run the symmetric test of the student.
        batch_size: images per forward pass.
        workers: DataLoader workers.
        ks: Recall@k values; defaults per dataset (:func:`default_ks`).
        cache: where to cache the teacher's database embeddings (needs ``teacher_sha256``).
        teacher_sha256: content hash of the teacher checkpoint, the cache key's identity of the teacher.
        progress: show progress bars.
        embed: replaces :func:`extract_embeddings` (same positional arguments), e.g. to shard extraction
            across processes; with multi-scale queries it is also given ``scales=``.
        teacher_device: where the teacher runs (default: ``device``).
        query_scales: multi-scale factors of the student's query embeddings (the reference's
            ``--multiscale``); the teacher's database is always embedded at the single scale 1.
        content_hash: key the teacher cache by the images' content instead of their size and mtime.
        precision: ``fp32`` (default, the paper's numbers) or ``bf16`` (opt-in: both networks' forward under
            bfloat16 autocast, see :func:`raml.retrieval.extract.bf16_support`); bf16 embeddings are never
            cached, nor read from the cache.
    """
    if teacher is None and not sym:
        raise ValueError("Nothing to test: give a teacher for the asymmetric test and/or ask for --sym.")
    if teacher is not None:
        check_compatible(student, teacher)
    query_scales = validate_scales(query_scales)
    check_scaled_size(query_scales, image_size, DEFAULT_MAX_PIXELS)  # before any work
    teacher_device = teacher_device if teacher_device is not None else device
    ks = tuple(ks) if ks is not None else default_ks(split.name)
    labels = torch.as_tensor(split.labels)
    paths = [str(p) for p in split.abspaths()]
    results: dict[str, dict[str, float]] = {}

    embed = embed or extract_embeddings
    # a custom ``embed`` without a ``scales`` argument keeps working for single-scale queries
    multiscale: dict[str, object] = {} if query_scales == SINGLE_SCALE else {"scales": query_scales}
    # likewise a custom ``embed`` without ``precision`` keeps working in fp32
    low_precision = {} if precision == "fp32" else {"precision": precision}
    multiscale.update(low_precision)
    query = embed(
        student,
        paths,
        image_size,
        device,
        batch_size,
        workers,
        progress,
        f"{split.name} student@{image_size}",
        **multiscale,
    )
    if teacher is not None:
        db_size = teacher_image_size or image_size

        def embed_database() -> torch.Tensor:
            return embed(
                teacher,
                paths,
                db_size,
                teacher_device,
                batch_size,
                workers,
                progress,
                f"{split.name} teacher@{db_size}",
                **low_precision,
            )

        if cache is not None and teacher_sha256 is not None and precision == "fp32":
            database = cache.get_or_compute(
                teacher_sha256,
                db_size,
                split.name,
                list(split.paths),
                embed_database,
                network_meta=getattr(teacher, "meta", None),
                root=split.root,
                content_hash=content_hash,
            )
        else:
            database = embed_database()
        # On a CUDA device the embeddings and the counting stay there (one transfer of the sums at the end).
        results["asym"] = retrieval_metrics(
            _on_eval_device(query, device), _on_eval_device(database, device), labels, labels, ks=ks, exclude_self=True
        )
        logger.info("%s asym: %s", split.name, _short(results["asym"]))
    if sym:
        on_device = _on_eval_device(query, device)
        results["sym"] = retrieval_metrics(on_device, on_device, labels, labels, ks=ks, exclude_self=True)
        logger.info("%s sym: %s", split.name, _short(results["sym"]))
    return results


def _on_eval_device(embeddings: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The embeddings on ``device`` when it is a CUDA device (where the exact evaluation runs fastest), else
    on the CPU (the numpy counting path; other accelerators lack the float64 the AP sums use)."""
    return embeddings.to(device) if device.type == "cuda" else embeddings.cpu()


def _short(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k == "mAP" or k.startswith("R@"))


def format_results_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per (dataset, test), one column per metric."""
    rows: list[list[str]] = []
    metric_names: list[str] = []
    for tests in results.values():
        for metrics in tests.values():
            for name in metrics:
                if (name == "mAP" or name.startswith("R@")) and name not in metric_names:
                    metric_names.append(name)
    header = ["dataset", "test", *metric_names]
    for dataset, tests in results.items():
        for test_name, metrics in tests.items():
            rows.append([dataset, test_name, *(f"{metrics[m]:.2f}" if m in metrics else "-" for m in metric_names)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
