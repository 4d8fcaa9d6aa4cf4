"""Query embedders of the service: a batch of transformed query images -> ``(B, D)`` float32 rows.

Contract (:class:`QueryEmbedder`): ``transform(size)`` is the evaluation transform of the query network at
one of its ``sizes`` (RGB ``PIL.Image`` -> ``(3, S, S)``); ``embed((B, 3, S, S) float32)`` -> ``(B, D)`` float32
numpy, L2-normalised, exactly what ``raml search`` computes for the same images (the same transform, network
call and dtype). Two implementations: a PyTorch network (:class:`TorchQueryEmbedder`) and an ONNX model exported
by ``raml export`` (:class:`OnnxQueryEmbedder`, preprocessing from its sidecar).

Threads (:func:`serving_threads`, :func:`use_serving_threads`): in a server, the query network shares the cores
with the HTTP event loop and the decoding threads. An intra-op thread pool as wide as the machine then fights them:
an OpenMP team whose threads are preempted waits for its slowest member at every operator, so a forward pass takes
many times the CPU it needs (measured on the project's 2-core machine under load, a batch of 32 at 32 px: 70 ms
of CPU with 1 thread, 470-690 ms with 2; see docs/deployment.md). The service therefore gives the network half
the cores (at least one) unless told otherwise.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from raml.data.images import EvalTransform
from raml.deploy.search import OnnxEmbedder, recorded_teacher_sha256
from raml.deploy.service.graph_network import record_graphs
from raml.retrieval.extract import embed_batch, network_mean_std
from raml.utils import MAX_THREADS

__all__ = [
    "OnnxQueryEmbedder",
    "QueryEmbedder",
    "TorchQueryEmbedder",
    "allowed_query_sizes",
    "available_cores",
    "serving_threads",
    "use_serving_threads",
]

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system reports it, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def serving_threads(cores: int) -> int:
    """Intra-op threads for the query network of a server on ``cores`` cores: half of them, at least one (the other
    half decodes images and runs the HTTP server; see the module docstring)."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores!r}.")
    return max(1, cores // 2)


#: the most intra-op threads :func:`use_serving_threads` sets (``--threads``'s bound, :data:`raml.utils.MAX_THREADS`)
MAX_SERVING_THREADS = MAX_THREADS


def use_serving_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (and faiss's OpenMP threads, when faiss is loaded) to ``threads``, by default
    :func:`serving_threads` of :func:`available_cores`; returns the number set. Process-wide: call it once, at the
    entry point of a server."""
    if threads is None:
        threads = serving_threads(available_cores())
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_SERVING_THREADS:
        raise ValueError(
            f"threads (raml serve --threads) must be a positive integer up to {MAX_SERVING_THREADS}, got {threads!r}."
        )
    torch.set_num_threads(threads)
    faiss = sys.modules.get("faiss")
    if faiss is not None and hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(threads)
    logger.info("Query network: %d intra-op thread(s) on %d core(s)", threads, available_cores())
    return threads


class QueryEmbedder(Protocol):
    """What the service needs of a query network (see the module docstring)."""

    output_dim: int
    sizes: tuple[int, ...]
    default_size: int
    teacher_sha256: str | None

    def transform(self, size: int) -> EvalTransform: ...

    def embed(self, images: torch.Tensor) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def allowed_query_sizes(meta: dict[str, Any], image_size: int | None) -> tuple[tuple[int, ...], int]:
    """The query sizes a network may be asked for, and the default one.

    A network whose ``meta`` lists ``image_sizes`` (a student trained for several query resolutions) serves
    those, by default ``image_size`` when given (it must be one of them) else the first listed; any other
    network serves ``image_size`` only.

    Raises:
        ValueError: If no size is known, or ``image_size`` is not among the network's ``image_sizes``.
    """
    listed = [int(s) for s in meta.get("image_sizes") or []]
    if listed:
        if image_size is not None and image_size not in listed:
            raise ValueError(
                f"--image-size {image_size} is not one of the query sizes this network was trained for "
                f"({', '.join(map(str, listed))}); choose one of them or omit --image-size."
            )
        return tuple(listed), int(image_size if image_size is not None else listed[0])
    if image_size is None:
        raise ValueError("The query network lists no image_sizes in its meta; give --image-size QR.")
    return (int(image_size),), int(image_size)


class TorchQueryEmbedder:
    """A PyTorch query network (the student) on one device.

    Args:
        network: ``(B, 3, S, S)`` -> ``(B, D)`` L2-normalised, in eval mode, on ``device``.
        device: Where it runs.
        image_size: The query size QR (see :func:`allowed_query_sizes`).
        graph: Run each size's forward pass as a recorded TorchScript graph, kept only where it equals the network
            bit for bit (:func:`raml.deploy.service.graph_network.record_graphs`): the pass then never waits for
            the GIL behind the event loop. ``False``: the network itself, operator by operator (``raml serve
            --eager``).
        channels_last: Serve a copy of the network with its weights in the channels-last memory format
            (``torch.channels_last``; the caller's network is left as it is). The convolutions then take oneDNN's
            NHWC kernels whatever the input's format (converting the input as well changed neither the time nor a
            bit): on the project's 2-core CPU a batch of 32 of the demo's ResNet-18 student took 32.3 ms at 24 px
            and 96.8 ms at 48 px against 48.9 and 121.9 ms (1.51x and 1.26x; one torch thread, traced,
            2026-12-04). The embeddings differ from the default format's in the last float32 bits (max abs
            difference 1.3e-7 on unit-norm 128-d embeddings): another summation order, the same numbers to
            within rounding. Opt-in (``raml serve --channels-last``): in ``raml bench serve`` it raised the batched
            saturation by 23-26 %, but the faster batches shrink the promise of goal (C) at 2x saturation (the
            window plus two batch times) while the latency outside the server does not shrink, and (C) was missed
            in both runs with it, met in both without (issue 20; docs/deployment.md). ``False`` (the default): the
            network's own format, bit for bit ``raml search``'s embeddings.
    """

    def __init__(
        self,
        network: nn.Module,
        device: torch.device,
        image_size: int | None,
        graph: bool = True,
        channels_last: bool = False,
    ) -> None:
        self.channels_last = bool(channels_last)
        if self.channels_last:  # a copy: the caller's network (e.g. also used for extraction) keeps its format
            network = copy.deepcopy(network).to(memory_format=torch.channels_last)
        self.network = network.eval()
        self.device = device
        meta = dict(getattr(network, "meta", {}) or {})
        self.sizes, self.default_size = allowed_query_sizes(meta, image_size)
        self.output_dim = int(getattr(network, "output_dim", 0) or meta.get("outputdim", 0))
        source = getattr(network, "source_path", None)
        self.source = str(source) if source is not None else None
        self.teacher_sha256 = recorded_teacher_sha256(source) if source is not None else None
        self.mean, self.std = network_mean_std(network)
        self._architecture = meta.get("architecture")
        self.graphs = record_graphs(self.network, self.sizes, device) if graph else {}

    def transform(self, size: int) -> EvalTransform:
        """The evaluation transform at ``size`` with the network's mean/std."""
        return EvalTransform(size, self.mean, self.std)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """``(B, 3, S, S)`` -> ``(B, D)`` float32 (the size's recorded graph where there is one)."""
        size = int(images.shape[-1])
        network = self.graphs.get(size, self.network) if int(images.shape[-2]) == size else self.network
        return embed_batch(network, images.to(self.device)).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """For ``/health``."""
        return {
            "kind": "pytorch",
            "path": self.source,
            "architecture": self._architecture,
            "output_dim": self.output_dim,
            "device": str(self.device),
            "graph_sizes": sorted(self.graphs),
            "memory_format": "channels_last" if self.channels_last else "contiguous",
        }


class OnnxQueryEmbedder:
    """An ONNX query model written by ``raml export`` (onnxruntime on the CPU, preprocessing from its sidecar).

    Args:
        path: The ``.onnx`` file (its sidecar ``<file>.json`` next to it).
        image_size: The query size; default the exported one (see :class:`raml.deploy.search.OnnxEmbedder`). A
            model exported with ``--dynamic-size`` whose sidecar lists ``image_sizes`` serves those sizes (and the
            exported one), by default the exported one.
        threads: onnxruntime intra-op threads; default ``torch.get_num_threads()``, which a server sets to its
            serving thread count first (:func:`use_serving_threads`, ``raml serve --threads``). Idle threads do not
            spin-wait: the pool shares the cores with the event loop and the decoding threads.
    """

    def __init__(self, path: str | Path, image_size: int | None = None, threads: int | None = None) -> None:
        if threads is None:
            threads = torch.get_num_threads()
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}.")
        self.threads = threads
        self._model = OnnxEmbedder(path, image_size, threads=threads, spinning=False)
        sidecar = self._model.sidecar
        if sidecar.get("dynamic_size") and sidecar.get("image_sizes"):
            # by default the exported size, as `raml search --onnx` and `raml test --student-onnx` (served too when
            # the export was made at a size outside the trained ones)
            exported = int(sidecar["image_size"])
            listed = [int(s) for s in sidecar["image_sizes"]]
            served = {"image_sizes": listed if exported in listed else [*listed, exported]}
            self.sizes, self.default_size = allowed_query_sizes(
                served, image_size if image_size is not None else exported
            )
        else:  # a fixed-size model runs at its one size only
            self.sizes, self.default_size = (self._model.image_size,), self._model.image_size
        self.output_dim = self._model.output_dim
        self.teacher_sha256 = self._model.teacher_sha256
        self.mean: Sequence[float] = sidecar["mean"]
        self.std: Sequence[float] = sidecar["std"]

    def transform(self, size: int) -> EvalTransform:
        """The evaluation transform at ``size`` with the sidecar's mean/std."""
        return EvalTransform(size, self.mean, self.std)

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """``(B, 3, S, S)`` -> ``(B, D)`` float32."""
        out = self._model.session.run(None, {self._model.input_name: images.numpy()})[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        """For ``/health``."""
        return {
            "kind": "onnx",
            "path": str(self._model.path),
            "output_dim": self.output_dim,
            "device": "cpu",
            "threads": self.threads,
        }
