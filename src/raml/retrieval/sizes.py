"""The test protocol at several query sizes against one teacher database (a student for several resolutions).

:func:`evaluate_sizes`: one :func:`raml.retrieval.evaluate.evaluate_split` per query size, the teacher's
database embedded once (kept in memory across the sizes, and in the on-disk cache when one is given), with
each size's query cost (GFLOPs per image, ``raml.models.cost``). Returns one entry per size:
``{"image_size": S, "query_gflops": G, "results": {split: {"asym": {...}, "sym": {...}}}}`` (percentages).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from raml.data.splits import Split
from raml.models.cost import gflops_per_image
from raml.retrieval.cache import EmbeddingCache
from raml.retrieval.evaluate import evaluate_split
from raml.retrieval.extract import SINGLE_SCALE, extract_embeddings

logger = logging.getLogger(__name__)

__all__ = ["DatabaseOnce", "evaluate_sizes", "format_sizes_table"]


class DatabaseOnce:
    """An ``embed`` function for :func:`evaluate_split` that embeds the database network's images once.

    Calls with ``database`` as the network are answered from memory after the first (per size and image
    list); every other call goes to :func:`extract_embeddings`. ``calls`` counts the database embeddings made.
    """

    def __init__(self, database: nn.Module) -> None:
        self.database = database
        self.memo: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}
        self.calls = 0

    def __call__(
        self, network: nn.Module, paths: list[str], image_size: int, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if network is not self.database:
            return extract_embeddings(network, paths, image_size, *args, **kwargs)
        key = (int(image_size), tuple(paths))
        if key not in self.memo:
            self.calls += 1
            self.memo[key] = extract_embeddings(network, paths, image_size, *args, **kwargs)
        return self.memo[key]


def evaluate_sizes(
    student: nn.Module,
    splits: Sequence[Split],
    sizes: Sequence[int],
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
    teacher_device: torch.device | None = None,
    query_scales: Sequence[float] = SINGLE_SCALE,
    content_hash: bool = False,
    embed: DatabaseOnce | None = None,
) -> list[dict[str, Any]]:
    """Test ``student`` at every query size of ``sizes`` on every split (arguments as :func:`evaluate_split`).

    ``embed``: a :class:`DatabaseOnce` shared by several calls (e.g. several students against one teacher
    database); by default a new one for this call.

    Returns:
        One entry per size, in the order given: ``image_size``, ``query_gflops`` (one ``(1, 3, S, S)``
        forward pass of the student) and ``results`` (split name -> ``{"asym": ..., "sym": ...}``).
    """
    if not sizes:
        raise ValueError("sizes is empty: give at least one query size.")
    if embed is None:
        embed = DatabaseOnce(teacher) if teacher is not None else extract_embeddings
    entries = []
    for size in sizes:
        results = {
            split.name: evaluate_split(
                student,
                split,
                int(size),
                device,
                teacher=teacher,
                teacher_image_size=teacher_image_size,
                sym=sym,
                batch_size=batch_size,
                workers=workers,
                ks=ks,
                cache=cache,
                teacher_sha256=teacher_sha256,
                progress=progress,
                embed=embed,
                teacher_device=teacher_device,
                query_scales=query_scales,
                content_hash=content_hash,
            )
            for split in splits
        }
        entries.append(
            {"image_size": int(size), "query_gflops": gflops_per_image(student, int(size), device), "results": results}
        )
    return entries


def format_sizes_table(entries: list[dict[str, Any]]) -> str:
    """A plain-text table: one row per (query size, dataset) with asym and sym mAP and R@1 and the GFLOPs."""
    header = ["size", "dataset", "asym mAP", "asym R@1", "sym mAP", "sym R@1", "query GFLOPs"]
    rows = []
    for entry in entries:
        for dataset, tests in entry["results"].items():
            cells = [str(entry["image_size"]), dataset]
            for test in ("asym", "sym"):
                metrics = tests.get(test)
                cells += [f"{metrics['mAP']:.2f}", f"{metrics['R@1']:.2f}"] if metrics else ["-", "-"]
            rows.append([*cells, f"{entry['query_gflops']:.4f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
