"""The query network's share of the cores in a server (issue 20's profile: OpenMP threads against decode threads)."""

from __future__ import annotations

import pytest
import torch

from raml.deploy.service.embedders import available_cores, serving_threads, use_serving_threads


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8)])
def test_the_network_gets_half_the_cores_and_at_least_one(cores, threads):
    assert serving_threads(cores) == threads


def test_use_serving_threads_sets_torch_and_faiss_and_defaults_to_half_the_cores():
    faiss = pytest.importorskip("faiss")
    before = torch.get_num_threads()
    try:
        assert use_serving_threads() == serving_threads(available_cores()) == torch.get_num_threads()
        assert use_serving_threads(3) == 3 and torch.get_num_threads() == 3
        assert faiss.omp_get_max_threads() == 3
        with pytest.raises(ValueError, match="positive integer"):
            use_serving_threads(0)
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(before)


def test_raml_serve_takes_threads_and_a_queue_wait_bound_from_its_flags():
    pytest.importorskip("starlette")
    import argparse

    from raml.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--index", "x", "--network-path", "n", "--threads", "2"])
    assert args.threads == 2 and args.max_queue_wait_ms is None
    args = parser.parse_args(["serve", "--index", "x", "--onnx", "m.onnx", "--max-queue-wait-ms", "150"])
    assert args.threads is None and args.max_queue_wait_ms == 150.0
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--index", "x", "--onnx", "m.onnx", "--max-queue-wait-ms", "0"])
