"""Export a query network to ONNX and/or TorchScript, with its preprocessing and a parity check.

Contract: the exported graph maps ``(B, 3, S, S)`` float32 images, already preprocessed, to ``(B, D)``
L2-normalised embeddings, exactly as ``EmbeddingNetwork.forward``. The batch axis is dynamic; the image
side is fixed at ``S`` unless ``dynamic_size`` is set (a student trained for several query sizes is exported
with a dynamic side and checked at each of its sizes, ``check_sizes``). Preprocessing is not part of the graph: it is
written to a sidecar JSON next to each exported file (``<file>.json``, see :func:`preprocessing_record`):
resize the shorter side to ``S * 8 / 7`` with PIL's Lanczos filter (each side rounded to the nearest
pixel), centre-crop ``S x S``, scale to [0, 1], subtract ``mean`` and divide by ``std`` per RGB channel
(``raml.data.EvalTransform``).

Every export is checked before it is kept: the exported model and PyTorch embed the same random inputs
(and real images when given) and the largest absolute difference must not exceed ``tolerance``
(1e-4 by default). The file is written to a temporary name, checked there, and renamed into place only if
the check passes, so a failed export never replaces a previous file.

Export runs on the CPU (the network is copied there); ONNX parity is checked with onnxruntime's CPU
provider. The ONNX exporter is chosen by ``exporter``: ``torchscript`` (``torch.onnx.export(dynamo=False)``,
fast and reliable for ResNet-style and timm CNNs), ``dynamo`` (``torch.export``-based), or ``auto`` (the
first, then the second if it fails).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raml.data.images import EvalTransform, eval_resize_size, load_image
from raml.retrieval.extract import network_mean_std
from raml.utils import atomic_path, atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TOLERANCE",
    "EXPORTERS",
    "SIDECAR_FORMAT",
    "ExportReport",
    "ParityError",
    "export_onnx",
    "check_graph_against_sidecar",
    "export_torchscript",
    "onnx_session",
    "preprocessing_record",
    "read_sidecar",
    "sidecar_path",
]

SIDECAR_FORMAT = "raml-preprocessing"
SIDECAR_VERSION = 1
DEFAULT_TOLERANCE = 1e-4
EXPORTERS = ("auto", "torchscript", "dynamo")
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
MIN_OPSET = 17
MAX_SIDECAR_BYTES = 2**20  # a sidecar is a few kB; the cap keeps a huge file from being read into memory


class ParityError(ValueError):
    """An exported model's embeddings differ from PyTorch's by more than the tolerance."""


@dataclass
class ExportReport:
    """What an export wrote and how well it matched PyTorch.

    Attributes:
        path: The exported model file.
        sidecar: Its preprocessing JSON.
        kind: ``onnx`` or ``torchscript``.
        exporter: The exporter that produced it (``torchscript``/``dynamo`` for ONNX, ``trace`` otherwise).
        max_abs_diff_random: Largest absolute embedding difference on random inputs.
        max_abs_diff_images: Largest absolute difference on real images (None when none were given).
        num_images: Real images checked.
        checked_shapes: Input shapes of the random check.
    """

    path: Path
    sidecar: Path
    kind: str
    exporter: str
    max_abs_diff_random: float
    max_abs_diff_images: float | None = None
    num_images: int = 0
    checked_shapes: list[list[int]] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """The largest difference over every check."""
        return max(self.max_abs_diff_random, self.max_abs_diff_images or 0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "path": str(self.path),
            "sidecar": str(self.sidecar),
            "kind": self.kind,
            "exporter": self.exporter,
            "max_abs_diff_random": self.max_abs_diff_random,
            "max_abs_diff_images": self.max_abs_diff_images,
            "num_images": self.num_images,
            "checked_shapes": self.checked_shapes,
        }


def sidecar_path(model_file: str | Path) -> Path:
    """The preprocessing sidecar of an exported file: ``<file>.json`` (e.g. ``student.onnx.json``)."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def preprocessing_record(
    network: nn.Module,
    image_size: int,
    dynamic_size: bool,
    kind: str,
    exporter: str,
    network_sha256: str | None = None,
    network_path: str | Path | None = None,
    teacher_sha256: str | None = None,
    model_sha256: str | None = None,
) -> dict[str, Any]:
    """The sidecar content: everything needed to feed the exported model and to identify it.

    Args:
        network: The exported network (its ``meta`` gives mean, std and output dimension).
        image_size: S.
        dynamic_size: Whether the image side is a dynamic axis.
        kind: ``onnx`` or ``torchscript``.
        exporter: Which exporter produced the file.
        network_sha256: Content hash of the source checkpoint.
        network_path: The source checkpoint.
        teacher_sha256: Hash of the teacher the network was distilled from (from the checkpoint), if any.
        model_sha256: Content hash of the exported file.
    """
    mean, std = network_mean_std(network)
    meta = dict(getattr(network, "meta", {}) or {})
    output_dim = meta_output_dim(network)
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "kind": kind,
        "exporter": exporter,
        "image_size": int(image_size),
        "dynamic_size": bool(dynamic_size),
        "resize": {
            "rule": "shorter side to S*8/7 with PIL Lanczos (each side rounded to the nearest pixel), centre crop S",
            "shorter_side": eval_resize_size(int(image_size)),
            "filter": "lanczos",
            "crop": "centre",
        },
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "channels": "RGB", "scale": "[0, 1]"},
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "output": {"name": OUTPUT_NAME, "dim": output_dim, "l2_normalised": True},
        "output_dim": output_dim,
        "network": {
            "path": str(network_path) if network_path is not None else None,
            "sha256": network_sha256,
            "meta": meta,
        },
        "teacher_sha256": teacher_sha256,
        "model_sha256": model_sha256,
    }


def read_sidecar(model_file: str | Path) -> dict[str, Any]:
    """Read and check the sidecar of an exported model.

    Raises:
        FileNotFoundError: If the model or its sidecar is missing.
        ValueError: If the sidecar is not a raml preprocessing description.
    """
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"Exported model {str(model_file)!r} does not exist; create it with `raml export`.")
    side = sidecar_path(model_file)
    if not side.is_file():
        raise FileNotFoundError(
            f"{str(model_file)!r} has no preprocessing sidecar {side.name!r} next to it; re-export it with "
            "`raml export` (the sidecar holds the image size, mean and std the model needs)."
        )
    try:
        size = side.stat().st_size
        if size > MAX_SIDECAR_BYTES:  # before reading: a sidecar is a few kB
            raise ValueError(
                f"Sidecar {side} is {size} bytes, more than a preprocessing sidecar can be ({MAX_SIDECAR_BYTES}); "
                "re-export the model with `raml export`."
            )
        record = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise ValueError(f"Sidecar {side} is unreadable ({reason}); re-export the model with `raml export`.") from None
    required = ("image_size", "mean", "std", "output_dim", "dynamic_size")
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT or any(k not in record for k in required):
        raise ValueError(
            f"{side} is not a raml preprocessing sidecar (format {SIDECAR_FORMAT!r} with {', '.join(required)}); "
            "re-export the model with `raml export`."
        )
    _check_sidecar_fields(record, side)
    recorded = record.get("model_sha256")
    if not isinstance(recorded, str) or not _SHA256_HEX.fullmatch(recorded):
        raise ValueError(
            f"{side} has no valid model_sha256 (64 hexadecimal digits naming the model file it describes; got "
            f"{recorded!r:.80}); re-export the model with `raml export`, which writes it."
        )
    actual = _cached_sha256(model_file)  # the file it describes: not another export's, nor a model replaced after it
    if actual != recorded:
        raise ValueError(
            f"{side} describes another model file than {model_file}: its model_sha256 {recorded[:12]}... differs "
            f"from the file's {actual[:12]}... (a sidecar copied from another export, a model replaced or "
            "edited after its export, or an export that was interrupted). Re-export the model with `raml export`."
        )
    return record


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_sidecar_fields(record: dict[str, Any], side: Path) -> None:
    """Refuse a sidecar whose fields have the wrong type (the readers would fail on them with a traceback)."""
    problems = []
    for key in ("image_size", "output_dim"):
        if not _positive_int(record[key]):
            problems.append(f"{key} must be a positive integer, got {record[key]!r:.60}")
    if not isinstance(record["dynamic_size"], bool):
        problems.append(f"dynamic_size must be true or false, got {record['dynamic_size']!r:.60}")
    for key in ("mean", "std"):
        value = record[key]
        numbers = (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        )
        if not numbers or (key == "std" and any(v <= 0 for v in value)):
            what = "three positive finite numbers" if key == "std" else "three finite numbers"
            problems.append(f"{key} must be {what} (one per RGB channel), got {value!r:.60}")
    sizes = record.get("image_sizes")
    if sizes is not None and not (isinstance(sizes, list) and sizes and all(_positive_int(v) for v in sizes)):
        problems.append(f"image_sizes must be a list of positive integers, got {sizes!r:.60}")
    if problems:
        raise ValueError(f"Sidecar {side} is malformed: {'; '.join(problems)}; re-export the model with `raml export`.")


_SHA256_BY_STAMP: dict[tuple[str, int, int], str] = {}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_graph_against_sidecar(session: Any, sidecar: dict[str, Any], model_file: str | Path) -> None:
    """Refuse an ONNX model whose graph contradicts its sidecar (read once the onnxruntime session is open).

    The readers feed the model the sidecar's image size and expect its ``output_dim``: a static output dimension
    other than ``output_dim``, a static height or width other than ``image_size``, or a fixed-size graph under a
    sidecar that claims a dynamic size (``dynamic_size``, several ``image_sizes``) would fail on every query
    instead of at load. Symbolic (dynamic) dimensions are accepted.

    Raises:
        ValueError: The graph and the sidecar disagree.
    """
    side = sidecar_path(model_file)
    fix = "the sidecar must be the one `raml export` wrote with the model; re-export it with `raml export`."
    inputs, outputs = session.get_inputs(), session.get_outputs()
    in_shape = list(inputs[0].shape) if inputs else []
    out_shape = list(outputs[0].shape) if outputs else []
    if len(in_shape) != 4 or len(out_shape) != 2:
        raise ValueError(
            f"{model_file} maps inputs of shape {in_shape} to {out_shape}, not (batch, 3, S, S) images to (batch, D) "
            f"embeddings; {fix}"
        )
    dim, size = out_shape[1], int(sidecar["image_size"])
    if isinstance(dim, int) and dim != int(sidecar["output_dim"]):
        raise ValueError(
            f"{model_file} outputs {dim}-d embeddings but its sidecar {side.name} says output_dim "
            f"{sidecar['output_dim']}; {fix}"
        )
    height, width = in_shape[2], in_shape[3]
    fixed = [d for d in (height, width) if isinstance(d, int)]
    if any(d != size for d in fixed):
        raise ValueError(
            f"{model_file} takes {height}x{width} images but its sidecar {side.name} says image_size {size}; {fix}"
        )
    several = len(sidecar.get("image_sizes") or []) > 1
    if fixed and (sidecar.get("dynamic_size") or several):
        raise ValueError(
            f"{model_file} takes {height}x{width} images only (a fixed-size graph) but its sidecar {side.name} "
            f"claims {'several query sizes (image_sizes)' if several else 'a dynamic size (dynamic_size)'}; {fix}"
        )


def _cached_sha256(path: Path) -> str:
    """The file's SHA-256, computed once a process per file version (path, size, modification time)."""
    stamp = path.stat()
    key = (str(path.resolve()), stamp.st_size, stamp.st_mtime_ns)
    if key not in _SHA256_BY_STAMP:
        _SHA256_BY_STAMP[key] = file_sha256(path)
    return _SHA256_BY_STAMP[key]


# -------------------------------------------------------------------------------------------- parity checks


def meta_output_dim(network: nn.Module) -> int:
    """The embedding size the network's ``meta["outputdim"]`` records (what a sidecar's ``output_dim`` says).

    Raises:
        ValueError: When it is missing or not a positive integer (a sidecar without it would be refused by every
            reader, so an export is refused before any work).
    """
    dim = (getattr(network, "meta", None) or {}).get("outputdim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"The network's meta has no positive integer 'outputdim' (got {dim!r}): the sidecar of an export "
            "records the embedding size from it. Load the network with raml.models.load_network, or set "
            "network.meta['outputdim'] to its embedding size."
        )
    return dim


def _check_args(image_size: int, tolerance: float) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}.")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}.")


def _random_inputs(
    image_size: int, dynamic_size: bool, seed: int = 0, check_sizes: Sequence[int] = ()
) -> list[torch.Tensor]:
    """Random parity inputs: batch 2 at S, batch 1 at S; with a dynamic size also batch 3 at another side,
    and batch 2 at each of ``check_sizes`` (the sizes a multi-size student was trained for)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(2, 3, image_size, image_size, generator=generator)]
    inputs.append(torch.randn(1, 3, image_size, image_size, generator=generator))
    if dynamic_size:
        other = image_size + max(8, image_size // 4)
        inputs.append(torch.randn(3, 3, other, other + 16, generator=generator))
    for size in check_sizes:
        if size != image_size:
            inputs.append(torch.randn(2, 3, size, size, generator=generator))
    return inputs


def _image_batches(
    network: nn.Module, image_paths: Sequence[str | Path], image_size: int, batch_size: int = 16
) -> list[torch.Tensor]:
    mean, std = network_mean_std(network)
    transform = EvalTransform(image_size, mean, std)
    tensors = [transform(load_image(p)) for p in image_paths]
    return [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]


def _max_diff(run_exported, network: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between the exported model's and PyTorch's embeddings of ``batches``
    (``inf`` where the exported model returns a NaN or an infinity: ``max`` and ``>`` would let a NaN through).

    Raises:
        ParityError: The shapes differ, or PyTorch's own embeddings are not finite (a diverged checkpoint, whose
            export nothing could check).
    """
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            reference = network(batch).numpy()
            if not np.isfinite(reference).all():
                raise ParityError(
                    f"The network outputs NaN/inf for a {tuple(batch.shape)} input batch (PyTorch, before any "
                    "export), so no export of it can be checked; nothing was written. Export a checkpoint whose "
                    "weights are finite (e.g. an earlier one of a training run that diverged)."
                )
            exported = np.asarray(run_exported(batch))
            if exported.shape != reference.shape:
                raise ParityError(
                    f"The exported model returned shape {exported.shape} for input {tuple(batch.shape)}, PyTorch "
                    f"{reference.shape}."
                )
            if not np.isfinite(exported).all():
                return float("inf")
            worst = max(worst, float(np.abs(exported - reference).max()))
    return worst


def _check_parity(
    run_exported,
    network: nn.Module,
    image_size: int,
    dynamic_size: bool,
    image_paths: Sequence[str | Path],
    tolerance: float,
    what: str,
    check_sizes: Sequence[int] = (),
) -> tuple[float, float | None, list[list[int]]]:
    inputs = _random_inputs(image_size, dynamic_size, check_sizes=check_sizes)
    random_diff = _max_diff(run_exported, network, inputs)
    image_sizes = [image_size, *(s for s in check_sizes if s != image_size)]
    image_diff = (
        max(_max_diff(run_exported, network, _image_batches(network, image_paths, s)) for s in image_sizes)
        if image_paths
        else None
    )
    worst = max(random_diff, image_diff or 0.0)
    logger.info(
        "%s parity: max |diff| %.3g on random inputs%s",
        what,
        random_diff,
        f", {image_diff:.3g} on {len(image_paths)} images" if image_diff is not None else "",
    )
    if not worst <= tolerance:  # NaN-aware: a NaN difference fails too
        raise ParityError(
            f"{what} export does not match PyTorch: max absolute embedding difference {worst:.3g} (random "
            f"inputs {random_diff:.3g}"
            + (f", images {image_diff:.3g}" if image_diff is not None else "")
            + ")"
            + (" (inf: the exported model outputs NaN/inf where PyTorch does not)" if not np.isfinite(worst) else "")
            + f" exceeds the tolerance {tolerance:g}; nothing was written. Try the other exporter "
            "(--exporter) or report the architecture."
        )
    return random_diff, image_diff, [list(t.shape) for t in inputs]


def _check_sizes_arg(network: nn.Module, dynamic_size: bool, check_sizes: Sequence[int]) -> list[int]:
    sizes = [int(s) for s in check_sizes]
    if any(s < 1 for s in sizes):
        raise ValueError(f"check_sizes must be positive image sides, got {sizes}.")
    if sizes and not dynamic_size:
        raise ValueError(
            f"check_sizes {sizes}: several input sizes need a dynamic side; pass dynamic_size=True (--dynamic-size)."
        )
    if dynamic_size and (getattr(network, "meta", None) or {}).get("bn_sizes"):
        raise ValueError(
            "This network has per-size BatchNorm statistics (meta['bn_sizes']), chosen in Python by the input "
            "size, which a traced graph cannot do: export one file per size (--image-size S without "
            "--dynamic-size); each holds that size's statistics."
        )
    return sizes


def _cpu_copy(network: nn.Module) -> nn.Module:
    return copy.deepcopy(network).to("cpu").eval()


# -------------------------------------------------------------------------------------------------- ONNX


def _onnx_export(
    network: nn.Module,
    example: torch.Tensor,
    target: Path,
    dynamic_size: bool,
    opset: int,
    exporter: str,
    min_side: int = 32,
) -> None:
    # The legacy exporter warns that it is deprecated and the tracer about the shape check in forward();
    # both are expected here, and the parity check below is what guards the result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if exporter == "torchscript":
            axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
            torch.onnx.export(
                network,
                (example,),
                str(target),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        else:
            dims = {0: torch.export.Dim("batch", min=1, max=4096)}
            if dynamic_size:
                dims[2] = torch.export.Dim("height", min=min_side, max=4096)
                dims[3] = torch.export.Dim("width", min=min_side, max=4096)
            torch.onnx.export(
                network,
                (example,),
                str(target),
                dynamo=True,
                opset_version=max(opset, 18),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(dims,),
                verbose=False,
            )


def onnx_session(path: str | Path, threads: int | None = None, spinning: bool = False) -> Any:
    """An onnxruntime CPU session of ``path``, with the project's settings (as :mod:`raml.models.onnx_forward`):
    every session raml opens (``raml serve/search --onnx``, ``raml test --student-onnx``, the export's parity
    check, the int8 calibration) is made here.

    Args:
        path: An ONNX model file.
        threads: onnxruntime intra-op threads; default ``torch.get_num_threads()`` when the session is made (the
            process's setting: ``raml serve --threads``, ``OMP_NUM_THREADS``), not onnxruntime's one per core.
        spinning: Let idle intra-op threads spin-wait for work (onnxruntime's own default). Off by default
            (``session.intra_op.allow_spinning`` 0): the pool shares the cores with the data loader's workers,
            a server's event loop and decoding threads, which spinning threads starve.

    Raises:
        ImportError: onnxruntime is not installed.
        ValueError: The file is not a model onnxruntime can load, or ``threads`` is not a positive integer.
    """
    try:
        import onnxruntime as ort
    except ImportError as error:  # pragma: no cover - installed in the dev environment
        raise ImportError("ONNX models need onnxruntime: `pip install onnxruntime` (or raml[export]).") from error
    if threads is None:
        threads = torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"onnxruntime threads must be a positive integer, got {threads!r}.")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise ValueError(
            f"{str(path)!r} is not an ONNX model that onnxruntime can load ({type(error).__name__}: "
            f"{str(error).strip()[:200]}); give a file written by `raml export`."
        ) from error


def _onnx_runner(path: Path):
    session = onnx_session(path)
    return lambda batch: session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]


def export_onnx(
    network: nn.Module,
    image_size: int,
    path: str | Path,
    dynamic_size: bool = False,
    opset: int = MIN_OPSET,
    exporter: str = "auto",
    image_paths: Sequence[str | Path] = (),
    tolerance: float = DEFAULT_TOLERANCE,
    network_sha256: str | None = None,
    network_path: str | Path | None = None,
    teacher_sha256: str | None = None,
    check_sizes: Sequence[int] = (),
    target: str | Path | None = None,
) -> ExportReport:
    """Export ``network`` to ONNX at ``path`` (plus its sidecar), after a parity check with onnxruntime.

    Args:
        network: ``(B, 3, S, S)`` -> ``(B, D)``; a CPU copy is exported.
        image_size: S.
        path: Output ``.onnx`` file.
        dynamic_size: Make height and width dynamic axes (the batch axis always is).
        opset: ONNX opset, at least 17 (the dynamo exporter uses at least 18).
        exporter: One of :data:`EXPORTERS`.
        image_paths: Real images for the parity check (besides random inputs).
        tolerance: Largest accepted absolute embedding difference.
        network_sha256: Source checkpoint hash, recorded in the sidecar.
        network_path: Source checkpoint path, recorded.
        teacher_sha256: The teacher this network was distilled for, recorded (``raml search`` checks it).
        check_sizes: With ``dynamic_size``: sides at which parity is checked too (a multi-size student's
            training sizes); recorded in the sidecar as ``image_sizes``.
        target: The file a write error names (default ``path``): the final file where ``path`` is a staging file
            that the caller moves into place (``raml export``).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ImportError: If onnx/onnxruntime are missing.
        ParityError: If the exported model differs by more than ``tolerance`` (nothing is written).
        ValueError: On bad arguments.
        OSError: If the model or its sidecar cannot be written (a full disk or quota, a file size limit, an I/O
            error, a short write; the other exporter is then not tried); the message names ``target``, and a
            previous file at ``path`` is kept as it was. Any other ``OSError`` of the first exporter is taken for
            its failure: the other one is tried.
    """
    _check_args(image_size, tolerance)
    meta_output_dim(network)  # before any work: every reader refuses a sidecar without it
    if exporter not in EXPORTERS:
        raise ValueError(f"Unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}.")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}.")
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as error:  # pragma: no cover - installed in the dev environment
        raise ImportError("ONNX export needs onnx and onnxruntime: `pip install raml[export]`.") from error
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:  # the dynamo exporter fell back to its own opset, 18, and said so only in a log line
        raise ValueError(
            f"opset {opset} is newer than the installed onnx knows (at most {newest}); give --opset "
            f"{MIN_OPSET} to {newest}."
        )
    check_sizes = _check_sizes_arg(network, dynamic_size, check_sizes)
    path = Path(path)
    shown = path if target is None else Path(target)
    net = _cpu_copy(network)
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    min_side = min([32, image_size, *check_sizes])
    candidates = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    with atomic_path(path) as tmp:
        used, used_opset = None, None
        for i, name in enumerate(candidates):
            try:
                with _writing(shown, "ONNX model", write_errors_only=True):
                    _onnx_export(net, example, tmp, dynamic_size, opset, name, min_side)
                import onnx

                onnx.checker.check_model(str(tmp))
                wanted, written = opset if name == "torchscript" else max(opset, 18), _default_opset(tmp)
                if written != wanted:
                    raise RuntimeError(f"it wrote opset {written}, not the {wanted} asked for")
                used, used_opset = name, written
                break
            except _WriteError:  # the file could not be written (a full disk): the other exporter would fail too
                raise
            except Exception as error:  # noqa: BLE001 - exporters raise many types; fall back or re-raise
                if i + 1 == len(candidates):
                    raise RuntimeError(f"ONNX export with the {name} exporter failed: {error}") from error
                logger.warning(
                    "ONNX export with the %s exporter failed (%s); trying %s", name, error, candidates[i + 1]
                )
        random_diff, image_diff, shapes = _check_parity(
            _onnx_runner(tmp), net, image_size, dynamic_size, image_paths, tolerance, "ONNX", check_sizes
        )
        record = preprocessing_record(
            net,
            image_size,
            dynamic_size,
            "onnx",
            str(used),
            network_sha256,
            network_path,
            teacher_sha256,
            file_sha256(tmp),
        )
        record["opset"] = used_opset  # read from the file once, when its exporter was checked
        if check_sizes:
            record["image_sizes"] = check_sizes
        with _writing(sidecar_path(shown), "sidecar"):
            atomic_write_text(sidecar_path(path), json.dumps(record, indent=2) + "\n")
    logger.info("Wrote %s (%s exporter) and %s", path, used, sidecar_path(path).name)
    return ExportReport(path, sidecar_path(path), "onnx", str(used), random_diff, image_diff, len(image_paths), shapes)


#: the errnos of a failed write of a file (a full disk or quota, a file size limit, an I/O error)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


class _WriteError(OSError):
    """A file of the export could not be written (raised by :func:`_writing`)."""


@contextlib.contextmanager
def _writing(path: Path, what: str, write_errors_only: bool = False) -> Iterator[None]:
    """Turn an ``OSError`` of the block, which writes the file shown as ``path`` (a full disk, an I/O error), into
    a :class:`_WriteError` that names the file, says nothing replaced it and how to go on. With
    ``write_errors_only`` (a block that does more than write: an ONNX exporter), only the errnos of
    :data:`_WRITE_ERRNOS` and a plain ``OSError`` without an errno (numpy's ``tofile`` short write, which the
    dynamo exporter's writer raises on a full disk) are; any other passes unchanged (a ``FileNotFoundError`` or
    ``PermissionError`` given only a message, as onnx raises for a file of its own, is no failed write)."""
    try:
        yield
    except OSError as error:
        # a short write: "165888 requested and 152656 written", raised as OSError itself, never a subclass
        short_write = error.errno is None and type(error) is OSError
        if write_errors_only and not short_write and error.errno not in _WRITE_ERRNOS:
            raise
        if error.errno == errno.ENOSPC:
            reason = "no space left on its disk"
        elif short_write:
            reason = f"{error}; the disk may be full"
        else:
            reason = error.strerror or str(error)
        message = (
            f"Could not write the {what} {path} ({reason}); nothing was written (a previous {path.name} is kept as "
            "it was). Free some space on that disk (or write elsewhere) and run the export again."
        )
        raise (_WriteError(message) if error.errno is None else _WriteError(error.errno, message)) from error


def _default_opset(path: Path) -> int | None:
    """The opset of the default ONNX domain that the model file at ``path`` imports (None without one)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(entry.version) for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


# ------------------------------------------------------------------------------------------- TorchScript


def export_torchscript(
    network: nn.Module,
    image_size: int,
    path: str | Path,
    dynamic_size: bool = False,
    image_paths: Sequence[str | Path] = (),
    tolerance: float = DEFAULT_TOLERANCE,
    network_sha256: str | None = None,
    network_path: str | Path | None = None,
    teacher_sha256: str | None = None,
    check_sizes: Sequence[int] = (),
    target: str | Path | None = None,
) -> ExportReport:
    """Trace ``network`` with ``torch.jit.trace`` and save it at ``path`` (plus its sidecar), after a parity check.

    The traced module is reloaded from the temporary file with ``torch.jit.load`` and compared with the
    network on random inputs (and ``image_paths``); see :func:`export_onnx` for the arguments.

    Raises:
        ParityError: If the traced module differs by more than ``tolerance`` (nothing is written).
        OSError: If the model or its sidecar cannot be written (e.g. a full disk); the message names the file, and
            a previous file at ``path`` is kept as it was.
    """
    _check_args(image_size, tolerance)
    meta_output_dim(network)  # before any work: every reader refuses a sidecar without it
    check_sizes = _check_sizes_arg(network, dynamic_size, check_sizes)
    path = Path(path)
    shown = path if target is None else Path(target)
    net = _cpu_copy(network)
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            # torch.jit.trace is deprecated in favour of torch.export, and the tracer flags the constant shape
            # check in forward(); the parity check below guards the result.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(net, example, check_trace=False)
            # serialised in memory, then written by Python: torch's C++ file writer aborts the interpreter when
            # the disk is full (an uncaught c10::Error) and leaves a partial file; a Python write raises OSError
            serialised = io.BytesIO()
            torch.jit.save(traced, serialised)
            with _writing(shown, "TorchScript model"), open(tmp, "wb") as file:
                file.write(serialised.getbuffer())
            del serialised
            loaded = torch.jit.load(str(tmp), map_location="cpu")

        def run(batch: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return loaded(batch).numpy()

        random_diff, image_diff, shapes = _check_parity(
            run, net, image_size, dynamic_size, image_paths, tolerance, "TorchScript", check_sizes
        )
        record = preprocessing_record(
            net,
            image_size,
            dynamic_size,
            "torchscript",
            "trace",
            network_sha256,
            network_path,
            teacher_sha256,
            file_sha256(tmp),
        )
        if check_sizes:
            record["image_sizes"] = check_sizes
        with _writing(sidecar_path(shown), "sidecar"):
            atomic_write_text(sidecar_path(path), json.dumps(record, indent=2) + "\n")
    logger.info("Wrote %s and %s", path, sidecar_path(path).name)
    return ExportReport(
        path, sidecar_path(path), "torchscript", "trace", random_diff, image_diff, len(image_paths), shapes
    )
