"""A query network backed by an exported ONNX model (fp32 or int8), usable wherever a PyTorch network embeds.

Contract: ``OnnxQueryNetwork(path)(images)`` maps ``(B, 3, S, S)`` float32 images, already preprocessed
(``raml.data.EvalTransform`` with the sidecar's mean and std), to ``(B, D)`` float32 embeddings on the
images' device, like ``EmbeddingNetwork.forward``. It carries the ``meta`` the evaluation reads
(``outputdim``, ``mean``, ``std``, and the exported checkpoint's own meta), so ``raml.retrieval.extract``,
``evaluate_split`` and ``evaluate_with_index`` use it unchanged: ``raml test --student-onnx FILE`` measures an
exported (e.g. quantised) student by the same protocol as the PyTorch one.

onnxruntime runs the model on the CPU (its ``CPUExecutionProvider``), whatever device the images are on.
The module has no parameters; ``train()`` changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raml.deploy.export import check_graph_against_sidecar, onnx_session, read_sidecar

logger = logging.getLogger(__name__)

__all__ = ["OnnxQueryNetwork"]


class OnnxQueryNetwork(nn.Module):
    """An exported query network as an ``nn.Module``: ``(B, 3, S, S)`` -> ``(B, D)`` through onnxruntime.

    Args:
        path: The ``.onnx`` file written by ``raml export`` (``--int8`` too), with its sidecar ``<file>.json``.
        threads: onnxruntime intra-op threads (default ``torch.get_num_threads()``; idle threads do not spin-wait:
            see :func:`raml.deploy.export.onnx_session`).

    Attributes:
        sidecar: The sidecar record.
        image_size: The exported size S (any size when ``dynamic_size``).
        dynamic_size: Whether height and width are dynamic axes.
        output_dim: D.
        meta: The exported checkpoint's meta with the sidecar's ``outputdim``, ``mean`` and ``std``.
        source_path: ``path``.
        teacher_sha256: The teacher hash recorded by the export, if any.

    Raises:
        FileNotFoundError: The model or its sidecar is missing.
        ValueError: The sidecar is not a raml sidecar, or the file is not an ONNX model.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.source_path = Path(path)
        self.sidecar = read_sidecar(self.source_path)
        if self.sidecar.get("kind", "onnx") != "onnx":
            raise ValueError(
                f"{self.source_path} is a {self.sidecar.get('kind')} export, not ONNX; export the network with "
                "`raml export --output FILE.onnx`."
            )
        self.image_size = int(self.sidecar["image_size"])
        self.dynamic_size = bool(self.sidecar["dynamic_size"])
        self.output_dim = int(self.sidecar["output_dim"])
        self.teacher_sha256: str | None = self.sidecar.get("teacher_sha256")
        network_meta = (self.sidecar.get("network") or {}).get("meta") or {}
        self.meta: dict[str, Any] = {
            **network_meta,
            "outputdim": self.output_dim,
            "mean": list(self.sidecar["mean"]),
            "std": list(self.sidecar["std"]),
        }
        self.session = onnx_session(self.source_path, threads)
        check_graph_against_sidecar(self.session, self.sidecar, self.source_path)
        self.input_name = self.session.get_inputs()[0].name
        logger.info(
            "ONNX query network %s (%s, %d px%s, %d-d)",
            self.source_path,
            "int8" if self.sidecar.get("quantization") else "fp32",
            self.image_size,
            ", dynamic size" if self.dynamic_size else "",
            self.output_dim,
        )

    def check_image_size(self, image_size: int) -> None:
        """Refuse a query size a fixed-size export cannot take (before any image is read)."""
        if not self.dynamic_size and int(image_size) != self.image_size:
            raise ValueError(
                f"{self.source_path} was exported for {self.image_size} px images (fixed size) but the query size "
                f"is {image_size}; use --image-size {self.image_size}, or re-export with --image-size {image_size} "
                "(or --dynamic-size)."
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float preprocessed images -> ``(B, D)`` float32 embeddings on the images' device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected a (B, 3, H, W) batch of images, got shape {tuple(images.shape)}.")
        if not self.dynamic_size and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.source_path} takes {self.image_size}x{self.image_size} images (fixed size), got "
                f"{images.shape[-2]}x{images.shape[-1]}; re-export with --dynamic-size for other sizes."
            )
        batch = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        out = self.session.run(None, {self.input_name: batch})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(images.device)

    def extra_repr(self) -> str:
        return f"path={str(self.source_path)!r}, image_size={self.image_size}, output_dim={self.output_dim}"
