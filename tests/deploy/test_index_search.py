"""``raml index`` / ``raml search`` and ``raml.deploy``: a tiny teacher indexes a generated dataset, a student
searches it; results are checked against the exact evaluation of ``raml.retrieval``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raml.cli import main as cli_main
from raml.data import get_split
from raml.deploy import (
    IndexDirectoryError,
    IndexParams,
    embed_images,
    evaluate_with_index,
    index_images,
    load_index,
    warn_if_other_teacher,
)
from raml.deploy.search import ranking_metrics
from raml.models import build_network, checkpoint_sha256, load_network, save_checkpoint
from raml.retrieval.extract import extract_embeddings
from raml.retrieval.metrics import average_precision, retrieval_metrics

QR, DR = 32, 48
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_and_networks) -> dict:
    """Generated data (synth-test: 4 classes x 5 images), a 16-d teacher, a 16-d student, an 8-d network."""
    base = tmp_path_factory.mktemp("deploy")
    root, nets = synth_and_networks("resnet18", {"teacher": (16, 0), "student": (16, 1), "narrow": (8, 2)})
    split = get_split("synth-test", root)
    index_dir = base / "index"
    code = cli_main.main(
        [
            "index",
            "--network-path",
            str(nets["teacher"]),
            "--image-size",
            str(DR),
            "--data-root",
            str(root),
            "--dataset",
            "synth-test",
            "--output",
            str(index_dir),
            "--workers",
            "0",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return {"base": base, "root": root, "nets": nets, "split": split, "index": index_dir}


def exact_embeddings(setup) -> tuple[torch.Tensor, torch.Tensor]:
    split = setup["split"]
    student = load_network(setup["nets"]["student"])
    teacher = load_network(setup["nets"]["teacher"])
    query = extract_embeddings(student, split.abspaths(), QR, CPU, progress=False)
    database = extract_embeddings(teacher, split.abspaths(), DR, CPU, progress=False)
    return query, database


def test_index_directory_contents(setup):
    index = load_index(setup["index"])
    assert type(index.index).__name__ == "IndexIDMap2"  # stable ids around an exact inner-product index
    assert type(__import__("faiss").downcast_index(index.index.index)).__name__ == "IndexFlatIP"
    split = setup["split"]
    meta = json.loads((setup["index"] / "index.json").read_text())
    assert meta["index_type"] == "flat" and meta["count"] == len(split) == 20
    assert meta["dim"] == 16 and meta["dtype"] == "float32" and meta["image_size"] == DR
    assert meta["network"]["sha256"] == checkpoint_sha256(setup["nets"]["teacher"])
    assert meta["network"]["meta"]["architecture"] == "resnet18"
    assert meta["datasets"] == ["synth-test"]
    assert index.paths == [str(p) for p in split.abspaths()]
    assert index.labels.tolist() == list(split.labels)
    assert index.embeddings.dtype == np.float32 and index.embeddings.shape == (20, 16)
    _, database = exact_embeddings(setup)
    np.testing.assert_allclose(index.embeddings, database.numpy(), atol=1e-6)


def test_search_gives_the_exact_top_k(setup, tmp_path, capsys):
    split = setup["split"]
    queries = [str(p) for p in split.abspaths()[::4]]
    out = tmp_path / "results.json"
    code = cli_main.main(
        [
            "search",
            "--network-path",
            str(setup["nets"]["student"]),
            "--image-size",
            str(QR),
            "--index",
            str(setup["index"]),
            "--k",
            "5",
            "--json",
            str(out),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
            *queries,
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "rank" in table and "score" in table and queries[0] in table
    results = json.loads(out.read_text())

    query, database = exact_embeddings(setup)
    similarities = query[::4] @ database.T  # the exact similarities of raml.retrieval
    paths = [str(p) for p in split.abspaths()]
    assert [r["query"] for r in results] == queries
    for row, entry in zip(similarities, results):
        expected = torch.argsort(row, descending=True)[:5].tolist()
        assert [hit["path"] for hit in entry["results"]] == [paths[i] for i in expected]
        np.testing.assert_allclose([hit["score"] for hit in entry["results"]], row[expected].numpy(), atol=1e-5)


def test_flat_index_evaluation_equals_exact_metrics(setup):
    student = load_network(setup["nets"]["student"])
    result = evaluate_with_index(student, setup["split"], QR, setup["index"], CPU, ks=(1, 2, 4, 8))
    query, database = exact_embeddings(setup)
    labels = list(setup["split"].labels)
    exact = retrieval_metrics(query, database, labels, labels, ks=(1, 2, 4, 8), exclude_self=True)
    assert result["index_type"] == "flat" and result["search_k"] == 20
    for key in ("mAP", "R@1", "R@2", "R@4", "R@8", "num_queries", "num_no_positive"):
        assert result[key] == pytest.approx(exact[key], abs=1e-9), key


def test_ivf_probing_every_cell_is_exact_and_approximate_indexes_evaluate(setup, tmp_path):
    teacher = load_network(setup["nets"]["teacher"])
    student = load_network(setup["nets"]["student"])
    split = setup["split"]
    paths = [str(p) for p in split.abspaths()]
    sha = checkpoint_sha256(setup["nets"]["teacher"])
    flat = evaluate_with_index(student, split, QR, setup["index"], CPU)
    for params in (
        IndexParams("ivf", nlist=4),
        IndexParams("hnsw", hnsw_m=4),
        IndexParams("ivfpq", nlist=2, m=4, nbits=3),
    ):
        directory = tmp_path / params.index_type
        index_images(teacher, paths, DR, directory, sha, labels=list(split.labels), dataset=split.name, params=params)
        meta = json.loads((directory / "index.json").read_text())
        assert meta["index_type"] == params.index_type
        expected_class = {"ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat", "ivfpq": "IndexIVFPQ"}[params.index_type]
        faiss_index = load_index(directory).index
        if type(faiss_index).__name__ == "IndexIDMap2":  # flat and HNSW carry stable ids in an id map
            faiss_index = __import__("faiss").downcast_index(faiss_index.index)
        assert type(faiss_index).__name__ == expected_class and faiss_index.metric_type == 0  # METRIC_INNER_PRODUCT
        result = evaluate_with_index(student, split, QR, directory, CPU)
        assert 0.0 < result["mAP"] <= 100.0 and result["num_queries"] == 20
        if params.index_type == "ivf":
            assert meta["params"]["nlist"] == 4 and meta["params"]["nprobe"] == 1  # default nlist // 8, at least 1
            exhaustive = evaluate_with_index(student, split, QR, directory, CPU, nprobe=4)
            assert exhaustive["mAP"] == pytest.approx(flat["mAP"], abs=1e-9)
            assert exhaustive["R@1"] == flat["R@1"]


def _slow_average_precision(ids, scores, labels_db, label, own):
    """Full ranking written out: returned items by score (ties: negatives first), then unreturned negatives,
    then unreturned positives; AP by the SPEC formula."""
    returned = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0 and i != own]
    returned.sort(key=lambda t: (-t[0], labels_db[t[1]] == label))
    ranking = [i for _, i in returned]
    rest = [i for i in range(len(labels_db)) if i != own and i not in ranking]
    ranking += [i for i in rest if labels_db[i] != label] + [i for i in rest if labels_db[i] == label]
    ranks = [r for r, i in enumerate(ranking) if labels_db[i] == label]
    ap = 0.0
    for j, r in enumerate(ranks):
        p0 = 1.0 if r == 0 else j / r
        ap += (p0 + (j + 1) / (r + 1)) / 2 / len(ranks)
    return ap, ranks[0]


def test_ranking_metrics_with_unreturned_items_match_a_slow_implementation():
    rng = np.random.default_rng(0)
    labels_db = rng.integers(0, 4, 30)
    ap_total, hits_total = 0.0, np.zeros(3, dtype=int)
    ids_rows, score_rows, query_labels, junk = [], [], [], []
    for _ in range(12):
        order = rng.permutation(30)[:18]  # the index returns 18 of 30 items, some slots empty
        scores = np.sort(rng.random(18).round(1))[::-1].astype(np.float32)  # rounded: ties happen
        order[rng.random(18) < 0.2] = -1
        own = int(rng.integers(-1, 30))
        label = int(labels_db[own]) if own >= 0 else int(rng.integers(0, 4))
        ids_rows.append(order)
        score_rows.append(scores)
        query_labels.append(label)
        junk.append(own)
        ap, first = _slow_average_precision(order, scores, labels_db, label, own)
        ap_total += ap
        hits_total += first < np.array([1, 5, 10])
    ap_sum, hits, scored, none = ranking_metrics(
        np.array(ids_rows), np.array(score_rows), np.array(query_labels), labels_db, np.array(junk), (1, 5, 10)
    )
    assert scored == 12 and none == 0
    assert ap_sum == pytest.approx(ap_total, abs=1e-12)
    assert hits.tolist() == hits_total.tolist()
    assert average_precision([0]) == 1.0


def test_student_with_another_dimension_is_refused_with_nothing_written(setup, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("previous results")
    query = str(setup["split"].abspaths()[0])
    code = cli_main.main(
        [
            "search",
            "--network-path",
            str(setup["nets"]["narrow"]),
            "--image-size",
            str(QR),
            "--index",
            str(setup["index"]),
            "--json",
            str(out),
            "--device",
            "cpu",
            query,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "8 dimensions" in err and "16-dimensional" in err
    assert out.read_text() == "previous results"
    with pytest.raises(ValueError, match="8 dimensions"):
        evaluate_with_index(load_network(setup["nets"]["narrow"]), setup["split"], QR, setup["index"], CPU)


def _snapshot(directory: Path) -> dict[str, bytes]:
    """The files of an index directory (the shard work folders a failed run keeps for the next are left out)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_append_skips_duplicates_and_keeps_one_generation(setup, tmp_path):
    split = setup["split"]
    images = tmp_path / "images"
    for p in split.abspaths():
        target = images / p.parent.name / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    every = sorted(str(p) for p in images.rglob("*.jpg"))
    listing = tmp_path / "lists" / "first.txt"
    listing.parent.mkdir()
    # relative to the list's folder; one line repeated, a comment and a blank line
    lines = ["# first half", *[str(Path("..") / Path(p).relative_to(tmp_path)) for p in every[:8]], "", ""]
    lines.insert(2, lines[1])
    listing.write_text("\n".join(lines))
    index_dir = tmp_path / "index"
    common = [
        "--network-path",
        str(setup["nets"]["teacher"]),
        "--image-size",
        str(DR),
        "--output",
        str(index_dir),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert cli_main.main(["index", "--list", str(listing), *common]) == 0
    first = load_index(index_dir)
    assert len(first) == 8 and first.paths[0] == str(listing.parent / ".." / Path(every[0]).relative_to(tmp_path))
    assert (first.labels == -1).all()

    summary = tmp_path / "summary.json"
    assert cli_main.main(["index", "--images", str(images), "--json", str(summary), *common]) == 0
    report = json.loads(summary.read_text())
    assert report["added"] == 12 and report["skipped"] == 8 and report["count"] == 20
    index = load_index(index_dir)
    assert index.paths[:8] == first.paths and index.paths[8:] == every[8:]
    np.testing.assert_array_equal(index.embeddings[:8], first.embeddings)
    assert index.index.ntotal == 20 and index.meta["generation"] == 2
    # only the committed generation's files remain
    assert sorted(p.name for p in index_dir.iterdir()) == sorted(["index.json", *index.meta["files"].values()])
    # exact search still agrees with the stored embeddings
    scores, ids = index.search(index.embeddings[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]

    before = _snapshot(index_dir)
    assert cli_main.main(["index", "--images", str(images), *common]) == 0  # nothing new
    assert _snapshot(index_dir) == before


def test_append_with_another_network_size_or_type_is_refused(setup, tmp_path, capsys):
    index_dir = tmp_path / "index"
    shutil.copytree(setup["index"], index_dir)
    before = _snapshot(index_dir)
    query = str(setup["split"].abspaths()[0])
    base = ["--images", str(Path(query).parent), "--output", str(index_dir), "--device", "cpu", "--workers", "0"]
    cases = [
        (["--network-path", str(setup["nets"]["student"]), "--image-size", str(DR)], "built by the network"),
        (["--network-path", str(setup["nets"]["teacher"]), "--image-size", str(QR)], "--image-size 48"),
        (
            ["--network-path", str(setup["nets"]["teacher"]), "--image-size", str(DR), "--index-type", "ivf"],
            "--overwrite",
        ),
    ]
    for extra, message in cases:
        assert cli_main.main(["index", *extra, *base]) == 2
        assert message in capsys.readouterr().err
        assert _snapshot(index_dir) == before


def test_bad_index_inputs_are_clear_errors_and_write_nothing(setup, tmp_path, capsys):
    teacher = ["--network-path", str(setup["nets"]["teacher"]), "--device", "cpu", "--workers", "0"]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing_list = tmp_path / "list.txt"
    missing_list.write_text("nowhere/a.jpg\n")
    binary_list = tmp_path / "binary.txt"
    binary_list.write_bytes(b"\xff\xfe\x00junk")
    cases = [
        (["--images", str(setup["split"].root), "--output", str(occupied)], "non-empty folder"),
        (["--images", str(empty), "--output", str(tmp_path / "a")], "No images found"),
        (["--list", str(missing_list), "--output", str(tmp_path / "b")], "do not exist"),
        (["--list", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "c")], "does not exist"),
        (["--list", str(empty), "--output", str(tmp_path / "c2")], f"--list '{empty}' is a folder"),
        (["--list", str(binary_list), "--output", str(tmp_path / "c3")], "is not UTF-8 text (byte 0 cannot"),
        (
            [
                "--dataset",
                "synth-test",
                "--data-root",
                str(setup["root"]),
                "--index-type",
                "ivf",
                "--nlist",
                "50",
                "--output",
                str(tmp_path / "d"),
            ],
            "--nlist 50",
        ),
        (
            [
                "--dataset",
                "synth-test",
                "--data-root",
                str(setup["root"]),
                "--index-type",
                "ivfpq",
                "--m",
                "5",
                "--output",
                str(tmp_path / "e"),
            ],
            "must divide",
        ),
    ]
    for extra, message in cases:
        assert cli_main.main(["index", *teacher, *extra]) == 2
        assert message in capsys.readouterr().err
    assert _snapshot(occupied) == {"notes.txt": b"mine"}
    assert not any((tmp_path / name).exists() for name in "abcde")
    # a missing query image: nothing printed, nothing written
    out = tmp_path / "r.json"
    code = cli_main.main(
        [
            "search",
            "--network-path",
            str(setup["nets"]["student"]),
            "--index",
            str(setup["index"]),
            "--image-size",
            str(QR),
            "--json",
            str(out),
            "--device",
            "cpu",
            str(tmp_path / "q.jpg"),
        ]
    )
    assert code == 2 and "do not exist" in capsys.readouterr().err and not out.exists()
    code = cli_main.main(
        [
            "search",
            "--network-path",
            str(setup["nets"]["student"]),
            "--index",
            str(tmp_path),
            "--device",
            "cpu",
            str(tmp_path / "q.jpg"),
        ]
    )
    assert code == 2 and "index.json is missing" in capsys.readouterr().err


def test_a_crash_mid_write_leaves_the_previous_index_intact(setup, tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    shutil.copytree(setup["index"], index_dir)
    before = _snapshot(index_dir)
    teacher = load_network(setup["nets"]["teacher"])
    sha = checkpoint_sha256(setup["nets"]["teacher"])
    extra = [str(p) for p in sorted(Path(setup["split"].root).rglob("*.jpg"))[:3]]  # train images, not indexed yet

    def crash() -> None:
        raise KeyboardInterrupt("simulated crash before the commit")

    with pytest.raises(KeyboardInterrupt):
        index_images(teacher, extra, DR, index_dir, sha, before_commit=crash)
    assert _snapshot(index_dir) == before

    import faiss

    def broken_write(index, path):
        Path(path).write_bytes(b"half an index")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(OSError, match="disk full"):
        index_images(teacher, extra, DR, index_dir, sha)
    assert _snapshot(index_dir) == before
    monkeypatch.undo()
    assert len(load_index(index_dir)) == 20
    # the next successful update commits and cleans up
    summary = index_images(teacher, extra, DR, index_dir, sha)
    assert summary["added"] == 3 and len(load_index(index_dir)) == 23


def test_teacher_mismatch_warns(setup, tmp_path, caplog, capsys):
    index = load_index(setup["index"])
    with caplog.at_level(logging.WARNING, logger="raml.deploy.search"):
        assert warn_if_other_teacher("0" * 64, index)
        assert not warn_if_other_teacher(index.network_sha256, index)
        assert not warn_if_other_teacher(None, index)
    assert sum("different teacher" in r.message for r in caplog.records) == 1
    # through the CLI: a distilled student records its teacher in checkpoint["raml"]
    student = tmp_path / "distilled.pth"
    torch.manual_seed(1)
    save_checkpoint(
        student, build_network("resnet18", whitening=16, pretrained=False), extra={"raml": {"teacher_sha256": "f" * 64}}
    )
    query = str(setup["split"].abspaths()[0])
    capsys.readouterr()
    assert (
        cli_main.main(
            [
                "search",
                "--network-path",
                str(student),
                "--index",
                str(setup["index"]),
                "--image-size",
                str(QR),
                "--device",
                "cpu",
                "--workers",
                "0",
                query,
            ]
        )
        == 0
    )
    assert "different teacher" in capsys.readouterr().err


def test_sharded_extraction_equals_single_device(setup):
    network = load_network(setup["nets"]["teacher"])
    paths = [str(p) for p in setup["split"].abspaths()[:7]]
    single = embed_images(network, paths, QR, [CPU])
    sharded = embed_images(network, paths, QR, [CPU, CPU, CPU])
    np.testing.assert_allclose(sharded, single, atol=1e-6)


def test_evaluation_needs_an_index_of_the_same_labelled_split(setup, tmp_path):
    split = setup["split"]
    student = load_network(setup["nets"]["student"])
    index_dir = tmp_path / "unlabelled"
    teacher = load_network(setup["nets"]["teacher"])
    index_images(
        teacher, [str(p) for p in split.abspaths()], DR, index_dir, checkpoint_sha256(setup["nets"]["teacher"])
    )
    with pytest.raises(IndexDirectoryError, match="--dataset synth-test"):
        evaluate_with_index(student, split, QR, index_dir, CPU)


@pytest.mark.parametrize(
    ("num_vectors", "nlist", "nprobe", "train"),
    [
        (10_000, 256, 32, 10_000),  # 4 sqrt(N) = 400 > 10000 // 39 = 256 cells; nprobe = 256 // 8
        (1_000_000, 4000, 500, 200_000),  # 4 sqrt(N) = 4000 < 200000 // 39 = 5128; the sample is 200,000
        (3_000, 76, 9, 3_000),  # 4 sqrt(3000) = 219.1 > 3000 // 39 = 76
        (100, 2, 1, 100),  # 100 // 39 = 2; nprobe at least 1
        (30, 1, 1, 30),  # fewer than 39 training vectors: one cell
    ],
)
def test_ivf_defaults_are_4_sqrt_n_cells_at_most_one_per_39_training_vectors(num_vectors, nlist, nprobe, train):
    """The documented IVF defaults, hand-computed: nlist = max(1, min(round(4 sqrt N), train // 39)), nprobe =
    max(1, nlist // 8), train = min(N, 200000)."""
    resolved = IndexParams("ivf").resolve(num_vectors, 512)
    assert (resolved.nlist, resolved.nprobe, resolved.train_size) == (nlist, nprobe, train)


@pytest.mark.parametrize(
    ("dim", "num_vectors", "m", "nbits"),
    [
        (512, 10_000, 64, 8),  # the largest divisor of 512 up to 512 // 8 = 64; nbits 8
        (96, 10_000, 12, 8),  # divisors of 96 up to 12: 12
        (100, 10_000, 10, 8),  # divisors of 100 up to 12: 10
        (7, 10_000, 1, 8),  # 7 // 8 = 0: one sub-quantiser
        (64, 100, 8, 6),  # 100 training vectors: nbits = floor(log2 100) = 6
    ],
)
def test_ivfpq_defaults_largest_divisor_up_to_d_over_8_and_nbits_from_the_sample(dim, num_vectors, m, nbits):
    resolved = IndexParams("ivfpq").resolve(num_vectors, dim)
    assert (resolved.m, resolved.nbits) == (m, nbits)


def test_hnsw_searched_deeper_than_ef_search_keeps_k_candidates() -> None:
    """``ef_search`` 2 and k = 100: the candidate list is raised to k, so every query gets 100 real results (no
    -1), scored by their inner product, and its first is the brute-force nearest (a loop over the rows)."""
    from raml.deploy.faiss_index import apply_search_params, build_faiss_index

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = rows[:20] + 0.3 * rng.normal(size=(20, 16)).astype(np.float32)
    index, resolved = build_faiss_index(rows, IndexParams("hnsw", hnsw_m=4, ef_search=2))
    apply_search_params(index, resolved, k=100)
    scores, ids = index.search(queries, 100)
    assert (ids >= 0).all()
    for q, row_scores, row_ids in zip(queries, scores, ids):
        np.testing.assert_allclose(row_scores, [float(q @ rows[j]) for j in row_ids], rtol=1e-5, atol=1e-6)
        best = max(range(len(rows)), key=lambda j: float(q @ rows[j]))
        assert row_ids[0] == best


def test_search_images_drops_the_minus_one_ids_of_missing_results() -> None:
    """faiss pads a row it cannot fill with id -1 (an IVF search of too few cells): such entries are no results,
    not ``index.paths[-1]``. A stub index with hand-written search results."""
    from types import SimpleNamespace

    from raml.deploy.search import format_search_table, search_images

    scores = np.array([[0.9, 0.5, -3.4e38], [-3.4e38, -3.4e38, -3.4e38]], dtype=np.float32)
    ids = np.array([[2, 0, -1], [-1, -1, -1]], dtype=np.int64)
    stub = SimpleNamespace(paths=["a.jpg", "b.jpg", "c.jpg"], search=lambda queries, k, nprobe=None: (scores, ids))
    out = search_images(stub, np.zeros((2, 4), dtype=np.float32), ["q1.jpg", "q2.jpg"], k=3)
    assert out == [
        {
            "query": "q1.jpg",
            "results": [{"path": "c.jpg", "score": pytest.approx(0.9)}, {"path": "a.jpg", "score": 0.5}],
        },
        {"query": "q2.jpg", "results": []},
    ]
    assert "(no result)" in format_search_table(out)
