"""Search a teacher-built index with student queries; evaluate a student against such an index.

Contracts:
    * Query embedders map image files to ``(Q, D)`` float32 L2-normalised rows: a PyTorch network at QR
      (:func:`raml.deploy.embed.embed_images`) or an exported ONNX model (:class:`OnnxEmbedder`, whose
      preprocessing is read from the model's sidecar).
    * :func:`search_images`: query embeddings + :class:`~raml.deploy.store.DatabaseIndex` ->
      ``[{"query": path, "results": [{"path": db path as given to raml index, "score": float}, ...]}, ...]``,
      results by decreasing inner product.
    * :func:`evaluate_with_index`: a split's images as student queries against an index built on the same
      split -> ``{"mAP": %, "R@k": %, "num_queries", "num_no_positive", "index_type", "search_k"}``, with
      the definitions of ``raml.retrieval.metrics`` (each query's own image is junk; ties pessimistic).

mAP needs each query's full ranking. The index is therefore searched ``search_k`` deep, by default the
whole index size (fine for test-sized databases: the result matrix of one block of queries is
``block x N``). Approximate indexes may return fewer than ``search_k`` items (IVF only scans ``nprobe``
cells, HNSW only the graph neighbourhood it visits): database items an index does not return are ranked
after every returned one, the positives among them last (the pessimistic convention). With a flat index
the ranking is exact and the metrics equal ``raml.retrieval.retrieval_metrics``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from raml.data.datasets import ImageDataset
from raml.data.images import EvalTransform
from raml.data.splits import Split
from raml.deploy.embed import embed_images
from raml.deploy.export import check_graph_against_sidecar, onnx_session, read_sidecar
from raml.deploy.store import DatabaseIndex, IndexDirectoryError, load_index
from raml.models.checkpoints import run_record
from raml.retrieval.evaluate import default_ks
from raml.retrieval.extract import loader_workers
from raml.retrieval.metrics import average_precision

logger = logging.getLogger(__name__)

__all__ = [
    "OnnxEmbedder",
    "check_query_dim",
    "evaluate_with_index",
    "format_search_table",
    "ranking_metrics",
    "recorded_teacher_sha256",
    "search_images",
    "warn_if_other_teacher",
    "warn_if_untrained_size",
]

# Result entries (int64 id + float32 score) per block of queries when searching the whole index.
_BLOCK_ENTRIES = 16 * 2**20


def warn_if_untrained_size(image_size: int, trained_sizes: list[int] | None, what: str) -> None:
    """Log a warning when a multi-size student (``meta["image_sizes"]``) is asked for a size it was not trained at."""
    if trained_sizes and len(trained_sizes) > 1 and image_size not in trained_sizes:
        logger.warning(
            "%s was trained for query sizes %s; %d px queries are outside them and may retrieve worse.",
            what,
            trained_sizes,
            image_size,
        )


class OnnxEmbedder:
    """Embed images with an exported ONNX model through onnxruntime (CPU), preprocessing from its sidecar.

    Args:
        path: The ``.onnx`` file written by ``raml export`` (its sidecar ``<file>.json`` must be next to it).
        image_size: Query size; defaults to the sidecar's. A fixed-size model refuses any other size.
        threads: onnxruntime intra-op threads (default ``torch.get_num_threads()``, see
            :func:`raml.deploy.export.onnx_session`).
        spinning: Let idle intra-op threads spin-wait (default off, see :func:`raml.deploy.export.onnx_session`).

    Attributes:
        sidecar: The sidecar record.
        image_size: The size images are transformed to.
        output_dim: D.
    """

    def __init__(
        self, path: str | Path, image_size: int | None = None, threads: int | None = None, spinning: bool = False
    ) -> None:
        self.path = Path(path)
        self.sidecar = read_sidecar(self.path)
        exported_size = int(self.sidecar["image_size"])
        if image_size is not None and image_size != exported_size and not self.sidecar["dynamic_size"]:
            raise ValueError(
                f"{self.path} was exported for {exported_size} px images (fixed size) but --image-size is "
                f"{image_size}; omit --image-size, or re-export with --image-size {image_size} (or --dynamic-size)."
            )
        self.image_size = int(image_size or exported_size)
        warn_if_untrained_size(self.image_size, self.sidecar.get("image_sizes"), str(self.path))
        self.output_dim = int(self.sidecar["output_dim"])
        self.teacher_sha256: str | None = self.sidecar.get("teacher_sha256")
        self.session = onnx_session(self.path, threads, spinning)
        check_graph_against_sidecar(self.session, self.sidecar, self.path)
        self.input_name = self.session.get_inputs()[0].name

    def embed(
        self, paths: Sequence[str | Path], batch_size: int = 32, workers: int = 0, progress: bool = False
    ) -> np.ndarray:
        """Embed ``paths`` -> ``(N, D)`` float32, rows in path order."""
        transform = EvalTransform(self.image_size, self.sidecar["mean"], self.sidecar["std"])
        dataset = ImageDataset(list(paths), None, transform)
        workers = loader_workers(workers, len(dataset), batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        chunks = [
            np.asarray(self.session.run(None, {self.input_name: images.numpy()})[0], dtype=np.float32)
            for images, _ in tqdm(loader, desc="onnx queries", unit="batch", disable=not progress, leave=False)
        ]
        return np.concatenate(chunks)


def recorded_teacher_sha256(checkpoint_path: str | Path | None) -> str | None:
    """The teacher hash a raml training checkpoint records (``checkpoint["raml"]["teacher_sha256"]``), if any.

    Read through :func:`raml.models.checkpoints.run_record` (the record only: quiet, size-checked, memory-mapped),
    never the whole checkpoint: the network's own load has read (and reported on) this file."""
    if checkpoint_path is None:
        return None
    record = run_record(checkpoint_path)
    value = record.get("teacher_sha256") if record is not None else None
    return str(value) if value else None


def recorded_image_sizes(checkpoint_path: str | Path | None) -> tuple[int | None, int | None]:
    """The query and database sizes a raml training checkpoint records (``checkpoint["raml"]["image_size"]``
    and, for a run with a teacher, ``["teacher_image_size"]``); None for each one it does not record."""
    if checkpoint_path is None:
        return None, None
    record = run_record(checkpoint_path)  # quietly: the network's own load has read (and reported on) this file
    if record is None:
        return None, None

    def size(key: str) -> int | None:
        value = record.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    return size("image_size"), (size("teacher_image_size") if record.get("mode") != "sym" else None)


def warn_if_default_sizes(
    what: str,
    action: str,
    recorded: tuple[int | None, int | None],
    query_default: int | None,
    database_default: int | None = None,
) -> bool:
    """Warn once when a size left at its default differs from the size the network was trained at.

    Args:
        what: The network, as the user named it.
        action: What the command does at those sizes, e.g. ``"testing"``.
        recorded: ``(query size, database size)`` from :func:`recorded_image_sizes`.
        query_default: The query size used because ``--image-size`` was not given; None when it was given
            (or when the query size comes from elsewhere, e.g. a multi-size student's ``meta["image_sizes"]``).
        database_default: Likewise for the database size and ``--teacher-image-size``; None when given or unused.

    Returns:
        True when a warning was logged.
    """
    parts = [
        (label, flag, trained, used)
        for label, flag, trained, used in (
            ("QR", "--image-size", recorded[0], query_default),
            ("DR", "--teacher-image-size", recorded[1], database_default),
        )
        if trained is not None and used is not None and trained != used
    ]
    if not parts:
        return False
    logger.warning(
        "%s was trained at %s; %s at %s (the default%s): pass %s to use the size(s) it was trained at.",
        what,
        " / ".join(f"{label} {trained}" for label, _, trained, _ in parts),
        action,
        " / ".join(f"{label} {used}" for label, _, _, used in parts),
        "s" if len(parts) > 1 else "",
        " ".join(f"{flag} {trained}" for _, flag, trained, _ in parts),
    )
    return True


def check_query_dim(query_dim: int, index: DatabaseIndex) -> None:
    """Refuse a query network whose output dimension differs from the index's (before embedding anything)."""
    if int(query_dim) != index.dim:
        raise ValueError(
            f"The query network embeds into {query_dim} dimensions but the index at {index.directory} holds "
            f"{index.dim}-dimensional embeddings of {index.meta['network'].get('path')!r}; use a student "
            "distilled for that teacher (same output dimension)."
        )


def warn_if_other_teacher(teacher_sha256: str | None, index: DatabaseIndex) -> bool:
    """Warn when the student was distilled for a teacher other than the network that built the index.

    Returns:
        True when a warning was logged.
    """
    built_by = index.network_sha256
    if teacher_sha256 and built_by and teacher_sha256 != built_by:
        logger.warning(
            "The index at %s was built by %s (sha256 %s...), but the query network was distilled from a different "
            "teacher (sha256 %s...): its embeddings may not live in the index's space, and results may be poor.",
            index.directory,
            index.meta["network"].get("path"),
            built_by[:12],
            teacher_sha256[:12],
        )
        return True
    return False


def search_images(
    index: DatabaseIndex,
    queries: np.ndarray | torch.Tensor,
    query_paths: Sequence[str | Path],
    k: int = 10,
    nprobe: int | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` nearest database images of each query.

    Args:
        index: The database.
        queries: ``(Q, D)`` query embeddings, rows matching ``query_paths``.
        query_paths: The query files, echoed in the result.
        k: Results per query (at most the index size).
        nprobe: Override the index's IVF ``nprobe``.

    Returns:
        ``[{"query": path, "results": [{"path": ..., "score": ...}, ...]}, ...]`` in query order.
    """
    if len(query_paths) != len(queries):
        raise ValueError(f"Got {len(queries)} query embeddings for {len(query_paths)} query paths.")
    scores, ids = index.search(queries, k, nprobe=nprobe)
    out = []
    for path, row_scores, row_ids in zip(query_paths, scores, ids):
        results = [{"path": index.paths[int(i)], "score": float(s)} for s, i in zip(row_scores, row_ids) if int(i) >= 0]
        out.append({"query": str(path), "results": results})
    return out


def format_search_table(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table with one row per (query, rank): ``query  rank  score  path``."""
    rows = [["query", "rank", "score", "path"]]
    for entry in results:
        for rank, hit in enumerate(entry["results"], start=1):
            rows.append([entry["query"], str(rank), f"{hit['score']:.4f}", hit["path"]])
        if not entry["results"]:
            rows.append([entry["query"], "-", "-", "(no result)"])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in (1, 2) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(rows[0]), line(["-" * w for w in widths]), *(line(r) for r in rows[1:])])


# ------------------------------------------------------------------------------------------------ metrics


def ranking_metrics(
    ids: np.ndarray,
    scores: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    junk: np.ndarray,
    ks: Sequence[int],
    num_database: int | None = None,
) -> tuple[float, np.ndarray, int, int]:
    """Sum of AP, R@k hit counts, scored queries and queries without positives, from search results.

    Args:
        ids: ``(Q, K)`` database ids by decreasing score (-1 = no result).
        scores: ``(Q, K)`` their scores.
        query_labels: ``(Q,)`` labels.
        database_labels: ``(N,)`` labels.
        junk: ``(Q,)`` database id to ignore for each query (its own image), -1 for none.
        ks: The k of R@k.
        num_database: The number of database items; default N. Less when some rows are not in the index
            (removed images: tombstone rows, label -1).

    Returns:
        ``(ap_sum, hits per k, num_scored, num_no_positive)``; see the module docstring for unreturned items.
    """
    ks_arr = np.asarray(list(ks))
    class_count = {int(c): int(n) for c, n in zip(*np.unique(database_labels, return_counts=True))}
    num_database = database_labels.shape[0] if num_database is None else int(num_database)
    ap_sum, hits, scored, no_positive = 0.0, np.zeros(len(ks_arr), dtype=np.int64), 0, 0
    for row_ids, row_scores, label, own in zip(ids, scores, query_labels, junk):
        own = int(own)
        total_pos = class_count.get(int(label), 0) - int(own >= 0 and database_labels[own] == label)
        if total_pos == 0:
            no_positive += 1
            continue
        keep = (row_ids >= 0) & (row_ids != own)
        found, found_scores = row_ids[keep], row_scores[keep]
        is_pos = database_labels[found] == label
        pos_scores = np.sort(found_scores[is_pos])[::-1]
        neg_ascending = np.sort(found_scores[~is_pos])
        # rank of the j-th returned positive: j + negatives scoring at least as high (pessimistic ties)
        ranks = np.arange(pos_scores.size) + (neg_ascending.size - np.searchsorted(neg_ascending, pos_scores, "left"))
        missing = total_pos - pos_scores.size
        if missing:
            candidates = num_database - int(own >= 0) - found.size  # items the index did not return
            start = found.size + candidates - missing  # the unreturned negatives first
            ranks = np.concatenate([ranks, start + np.arange(missing)])
        ap_sum += average_precision(ranks.astype(np.int64))
        hits += ranks[0] < ks_arr
        scored += 1
    return ap_sum, hits, scored, no_positive


def _distilled_from(student: nn.Module) -> str | None:
    """The teacher hash a query network records: an ONNX student's sidecar value, else its raml checkpoint's."""
    if hasattr(student, "teacher_sha256"):
        return student.teacher_sha256
    source = getattr(student, "source_path", None)
    return recorded_teacher_sha256(source) if source is not None else None


def _file_key(path: str) -> str:
    """Identity of an image file for matching queries to index rows: its resolved path (symbolic links
    followed, so a linked data root that reaches the same files matches; a copy does not)."""
    return os.path.normcase(os.path.realpath(path))


def _own_rows(index: DatabaseIndex, split_name: str, query_paths: Sequence[str]) -> np.ndarray:
    """The index row of each query's own image, checking that the index's live rows and the queries correspond
    one to one (the same files, each once).

    Args:
        index: An index built on the split (``raml index --dataset <split_name>``).
        split_name: The split's name, for the message.
        query_paths: The split's image paths, one query each.

    Returns:
        ``(Q,)`` int64 row ids, query order.

    Raises:
        IndexDirectoryError: Naming an unmatched path of each side, if some query has no row or several rows of
            the same file, or some live row is no query's image.
    """
    rows_by_file: dict[str, list[int]] = {}
    for row in index.live_ids().tolist():
        rows_by_file.setdefault(_file_key(index.paths[row]), []).append(int(row))
    own = np.full(len(query_paths), -1, dtype=np.int64)
    missing: list[str] = []
    repeated: list[str] = []
    for i, path in enumerate(query_paths):
        rows = rows_by_file.get(_file_key(path), [])
        if len(rows) == 1:
            own[i] = rows[0]
        else:
            (repeated if rows else missing).append(path)
    matched = set(own[own >= 0].tolist())
    extra = [index.paths[row] for row in index.live_ids().tolist() if row not in matched]
    if not (missing or repeated or extra) and len(matched) == len(query_paths):
        return own
    problems = []
    if index.live_count != len(query_paths):
        problems.append(f"it holds {index.live_count} images, {split_name!r} has {len(query_paths)}")
    if missing or extra:
        built = f"built from {extra[0]!r}" if extra else "built without them"
        evaluating = f"evaluating {missing[0]!r}" if missing else "evaluating without them"
        problems.append(
            f"{len(missing)} of the split's images are not in it and {len(extra)} of its images are not in the "
            f"split ({built}, {evaluating})"
        )
    if repeated:
        problems.append(f"{len(repeated)} of the split's images are in it more than once (e.g. {repeated[0]!r})")
    if len(matched) < len(query_paths) - len(missing) - len(repeated):
        problems.append("several of the split's paths are the same file")
    removed = len(index) - index.live_count
    if missing and removed:
        problems.append(f"{removed} image{'s were' if removed > 1 else ' was'} removed from it (raml index --remove)")
    relative = next((p for p in extra if not os.path.isabs(p)), None)
    if relative is not None:  # an index written before paths were stored absolute (2026-12-05)
        problems.append(
            f"it stores relative paths (e.g. {relative!r}), read against the working directory: run from the folder "
            "it was built in"
        )
    raise IndexDirectoryError(
        f"The index at {index.directory} does not hold exactly the images of {split_name!r} as this --data-root "
        f"reaches them: {'; '.join(problems)}. Evaluate with the --data-root the index was built from, or rebuild "
        f"it from this one: `raml index --data-root <this root> --dataset {split_name} --output {index.directory} "
        "--overwrite ...`."
    )


@torch.inference_mode()
def evaluate_with_index(
    student: nn.Module,
    split: Split,
    image_size: int,
    index_dir: str | Path | DatabaseIndex,
    device: torch.device,
    ks: Sequence[int] | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
    search_k: int | None = None,
    nprobe: int | None = None,
    teacher_sha256: str | None = None,
) -> dict[str, Any]:
    """Asymmetric test of ``student`` against an index of ``split`` built by ``raml index``.

    Every image of the split is a query (student at ``image_size``); the database is the index with its
    stored labels; the database entry of the query's own image (same file) is junk. The index must hold
    labelled images of this split only (``raml index --data-root D --dataset <split.name>``), each split image
    exactly once, as the split reaches them: paths are compared resolved (a symbolic link to the data root
    it was built from is the same files; a copy of it is not).

    Args:
        student: Query network on ``device``.
        split: The test split the index was built on.
        image_size: Query resolution QR.
        index_dir: The index directory (or a loaded index).
        device: Where the student runs.
        ks: Recall@k values; default per dataset (``raml.retrieval.evaluate.default_ks``).
        batch_size: Images per forward pass.
        workers: DataLoader workers.
        progress: Show progress bars.
        search_k: Search depth; default the number of live images (the full ranking; see the module docstring).
        nprobe: Override the index's IVF ``nprobe``.
        teacher_sha256: Hash of the teacher the student was distilled from; a warning is logged when the
            index was built by another network (as ``raml search`` does). None: read from the student (an ONNX
            student's ``teacher_sha256``, else the raml checkpoint at its ``source_path``), if it records one.

    Returns:
        ``{"mAP", "R@k"..., "num_queries", "num_no_positive", "index_type", "search_k"}`` (percentages).

    Raises:
        ValueError: On a dimension mismatch.
        IndexDirectoryError: If the index is not one of exactly this split's labelled images (see above).
    """
    index = index_dir if isinstance(index_dir, DatabaseIndex) else load_index(index_dir)
    check_query_dim(int(getattr(student, "meta", {}).get("outputdim", index.dim)), index)
    warn_if_other_teacher(teacher_sha256 or _distilled_from(student), index)
    datasets = list(index.meta.get("datasets", []))
    unlabelled = bool((index.labels[index.live_ids()] < 0).any())
    if datasets != [split.name] or unlabelled:
        raise IndexDirectoryError(
            f"The index at {index.directory} holds {', '.join(datasets) or 'unlabelled images'}"
            f"{' and unlabelled images' if datasets and unlabelled else ''}; evaluating {split.name!r} "
            f"needs an index of exactly that split's labelled images: `raml index --dataset {split.name} ...`."
        )
    ks = tuple(ks) if ks is not None else default_ks(split.name)
    depth = index.live_count if search_k is None else min(int(search_k), index.live_count)
    query_paths = [str(p) for p in split.abspaths()]
    junk = _own_rows(index, split.name, query_paths)
    labels = np.asarray(split.labels, dtype=np.int64)
    # Query labels must be compared with the stored database labels of the same images.
    if not np.array_equal(index.labels[junk], labels):
        raise IndexDirectoryError(
            f"The labels stored in {index.directory} differ from {split.name!r}'s; rebuild the index from this split."
        )

    queries = embed_images(
        student, query_paths, image_size, [device], batch_size, workers, progress, f"{split.name} queries@{image_size}"
    )
    block = max(1, _BLOCK_ENTRIES // max(1, depth))
    ap_sum, hits, scored, no_positive = 0.0, np.zeros(len(ks), dtype=np.int64), 0, 0
    for start in range(0, queries.shape[0], block):
        stop = start + block
        scores, ids = index.search(queries[start:stop], depth, nprobe=nprobe)
        a, h, s, n = ranking_metrics(
            ids, scores, labels[start:stop], index.labels, junk[start:stop], ks, index.live_count
        )
        ap_sum, hits, scored, no_positive = ap_sum + a, hits + h, scored + s, no_positive + n
    if scored == 0:
        raise ValueError(f"No query of {split.name!r} has a positive in the index; every class needs two images.")
    result: dict[str, Any] = {"mAP": 100.0 * ap_sum / scored}
    for k, h in zip(ks, hits):
        result[f"R@{k}"] = 100.0 * float(h) / scored
    result.update(num_queries=scored, num_no_positive=no_positive, index_type=index.meta["index_type"], search_k=depth)
    logger.info(
        "%s via %s index: mAP %.2f, R@%d %.2f",
        split.name,
        result["index_type"],
        result["mAP"],
        ks[0],
        result[f"R@{ks[0]}"],
    )
    return result
