"""Static int8 quantisation of an exported ONNX query network (onnxruntime), checked against the fp32 model.

Contract: ``quantize_onnx(fp32, output, calibration_paths)`` reads an fp32 model written by
:func:`raml.deploy.export.export_onnx` (``(B, 3, S, S)`` -> ``(B, D)``, preprocessing in its sidecar) and
writes ``output``: the same graph with int8 weights and activations, plus its sidecar (the fp32 one with a
``quantization`` record).

How: the fp32 graph is first prepared by ``onnxruntime.quantization.quant_pre_process`` (shape inference
and graph optimisation, e.g. BatchNorm folded into the convolutions), then ``quantize_static`` inserts
QuantizeLinear/DequantizeLinear pairs (the QDQ format onnxruntime's CPU kernels are optimised for):
weights signed int8 (per output channel by default, which suits ResNet convolutions), activations unsigned
int8 with ranges calibrated on the calibration images (preprocessed exactly as at query time, through the
sidecar's transform, at every query size the model serves: the sidecar's ``image_sizes`` of a multi-size student,
else its ``image_size``), by the min/max of what they produce (``minmax``) or by a percentile
(``percentile``) or an entropy criterion (``entropy``).

Check before keeping: the fp32 and int8 models embed the check images that were not used for calibration
(``check_paths`` minus ``calibration_paths``), at every served size; the mean cosine similarity of the two
embeddings of each image must reach ``min_cosine`` (:data:`DEFAULT_MIN_COSINE`) and the worst one, over every
image and size, ``min_worst_cosine`` (:data:`DEFAULT_MIN_WORST_COSINE`); otherwise :class:`QuantizationError` is
raised and nothing is written. The
model is written to a temporary name and renamed into place only after the check, so an existing file is
never replaced by a failed quantisation.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raml.data.images import EvalTransform, load_image
from raml.deploy.export import _writing, check_graph_against_sidecar, onnx_session, read_sidecar, sidecar_path
from raml.utils import atomic_path, atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_MIN_COSINE",
    "DEFAULT_MIN_WORST_COSINE",
    "QuantizationError",
    "QuantizationReport",
    "evenly_spaced",
    "quantize_onnx",
    "served_sizes",
]

#: the mean fp32/int8 cosine similarity an int8 model must reach to be kept. The demo's trained ResNet-18
#: networks reach 0.999 (docs/deployment.md); a model calibrated on blank images, whose activation ranges
#: collapse, falls far below (tests/deploy/test_quantize.py).
DEFAULT_MIN_COSINE = 0.95
#: the cosine similarity every check image must reach at every size (the mean alone can hide a few images
#: the int8 model gets badly wrong)
DEFAULT_MIN_WORST_COSINE = 0.90
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
_BATCH = 16


class _QuietQuantizer(logging.Filter):
    """Drops the INFO lines onnxruntime's quantisation tools log on the root logger (one per copied bias, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "onnxruntime" not in record.pathname


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # A filter on the root logger sees only records logged on the root logger itself (what those tools do),
    # not those of named loggers propagating to it.
    quiet = _QuietQuantizer()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


@contextmanager
def _temporary_folder(folder: Path) -> Iterator[None]:
    """Make ``folder`` the temporary folder of ``tempfile`` while the block runs (then restore the previous one):
    onnxruntime's quantiser makes its own (``pre.quant.*``, ``ort.quant.*`` with a copy of the model) in the
    system's, where a killed export would leave them. ``tempfile.tempdir`` is process-global: the quantiser is
    run by a single thread (``raml export`` quantises nothing concurrently), so nothing else sees the change."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


class QuantizationError(ValueError):
    """The int8 model's embeddings are too far from the fp32 model's (nothing was written)."""


@dataclass
class QuantizationReport:
    """What a quantisation wrote and how close it stays to the fp32 model.

    Attributes:
        path: The int8 model.
        sidecar: Its preprocessing JSON.
        source: The fp32 model it was made from.
        fp32_bytes: Size of the fp32 file.
        int8_bytes: Size of the int8 file.
        calibration_images: Images the activation ranges were calibrated on.
        checked_images: Held-out images (not used for calibration) of the fp32/int8 comparison.
        mean_cosine: Mean cosine similarity of the fp32 and int8 embeddings of the same image, over the checked
            images at every size.
        min_cosine: The smallest one (the worst image at the worst size).
        method: Calibration method.
        per_channel: Whether weights have one scale per output channel.
        sizes: The query sizes calibrated and checked (every size the model serves).
        cosine_by_size: ``{size: {"mean", "min"}}``.
    """

    path: Path
    sidecar: Path
    source: Path
    fp32_bytes: int
    int8_bytes: int
    calibration_images: int
    checked_images: int
    mean_cosine: float
    min_cosine: float
    method: str
    per_channel: bool
    sizes: list[int]
    cosine_by_size: dict[str, dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def evenly_spaced(paths: Sequence[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``paths`` (first and last included; all of them when fewer).

    A split lists its images class by class, so the first ``count`` would cover a few classes only.
    """
    if count < 1:
        raise ValueError(f"The number of calibration images must be positive, got {count}.")
    if count >= len(paths):
        return list(paths)
    positions = np.unique(np.round(np.linspace(0, len(paths) - 1, count)).astype(int))
    return [paths[i] for i in positions]


def served_sizes(sidecar: dict[str, Any]) -> list[int]:
    """The query sizes a model serves: its sidecar's ``image_sizes`` (a multi-size student), else ``image_size``;
    the default size first."""
    default = int(sidecar["image_size"])
    listed = [int(s) for s in sidecar.get("image_sizes") or []]
    return [default, *(s for s in dict.fromkeys(listed) if s != default)]


def _preprocess(paths: Sequence[str | Path], sidecar: dict[str, Any], size: int) -> np.ndarray:
    transform = EvalTransform(size, sidecar["mean"], sidecar["std"])
    return torch.stack([transform(load_image(p)) for p in paths]).numpy()


class _Calibration:
    """onnxruntime's ``CalibrationDataReader`` protocol over preprocessed images, in batches of one size each
    (a multi-size student is calibrated on its images at every size it serves)."""

    def __init__(self, input_name: str, images: Sequence[np.ndarray]) -> None:
        self.input_name, self.images = input_name, list(images)
        self._batches: Iterator[np.ndarray] = iter(())
        self.rewind()

    def rewind(self) -> None:
        self._batches = iter([x[i : i + _BATCH] for x in self.images for i in range(0, len(x), _BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}


def _embed(session: Any, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: images[i : i + _BATCH]})[0] for i in range(0, len(images), _BATCH)]
    return np.concatenate(chunks).astype(np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def _calibration_reader(input_name: str, images: Sequence[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Calibration, CalibrationDataReader):
        pass

    return Reader(input_name, images)


def quantize_onnx(
    fp32_path: str | Path,
    output: str | Path,
    calibration_paths: Sequence[str | Path],
    check_paths: Sequence[str | Path] = (),
    method: str = "minmax",
    per_channel: bool = True,
    min_cosine: float = DEFAULT_MIN_COSINE,
    min_worst_cosine: float = DEFAULT_MIN_WORST_COSINE,
    calibration_split: str | None = None,
    source_label: str | None = None,
    work_dir: str | Path | None = None,
    target: str | Path | None = None,
) -> QuantizationReport:
    """Quantise an exported fp32 ONNX model to int8 (static, QDQ) and write it with its sidecar.

    Args:
        fp32_path: The fp32 ``.onnx`` file written by ``raml export`` (its sidecar next to it).
        output: The int8 ``.onnx`` file to write (a different file).
        calibration_paths: Images whose activations set the quantisation ranges (a few dozen to a few hundred
            images like the queries).
        check_paths: Images for the fp32/int8 comparison; those among the calibration images are left out
            (the check is on held-out images), and at least one must remain.
        method: One of :data:`CALIBRATION_METHODS`.
        per_channel: One weight scale per output channel (better accuracy for convolutions).
        min_cosine: The smallest acceptable mean fp32/int8 cosine similarity (over images and sizes).
        min_worst_cosine: The smallest acceptable cosine similarity of any one check image at any size.
        calibration_split: The split the calibration images came from, recorded in the sidecar.
        source_label: What the sidecar records as the fp32 model (default ``fp32_path``; e.g. the checkpoint
            when the fp32 model is a temporary file).
        work_dir: The folder its temporary folder (the prepared fp32 model) is made in; default the system's
            temporary folder (``raml export --int8`` gives its staging folder, which a killed export's next run
            removes). onnxruntime's own temporary folders are made in that temporary folder too.
        target: The file that errors name as the one written (default ``output``; ``raml export --int8`` writes
            ``output`` in a staging folder and names its --output).

    Raises:
        FileNotFoundError: A missing model, sidecar or image.
        ValueError: Bad arguments, an already quantised input, or a file that is not an ONNX model.
        QuantizationError: The int8 model is too far from the fp32 one; nothing is written.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    fp32_path, output = Path(fp32_path), Path(output)
    shown = output if target is None else Path(target)
    sidecar = read_sidecar(fp32_path)
    if sidecar.get("quantization"):
        raise ValueError(f"{fp32_path} is already quantised; quantise the fp32 export instead.")
    if output.suffix.lower() != ".onnx":
        raise ValueError(f"The int8 model must be written to a .onnx file, got {output}.")
    if output.resolve() == fp32_path.resolve():
        raise ValueError(f"The int8 model must not replace its fp32 source {fp32_path}; give another --output.")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    methods["entropy"] = CalibrationMethod.Entropy
    if method not in methods:
        raise ValueError(f"Unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}.")
    if not 0 < min_cosine <= 1:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine!r}.")
    if not calibration_paths:
        raise ValueError("Quantisation needs calibration images; give at least one.")
    if not 0 < min_worst_cosine <= 1:
        raise ValueError(f"min_worst_cosine must be in (0, 1], got {min_worst_cosine!r}.")
    calibrated = {Path(p).resolve() for p in calibration_paths}
    held_out = list(dict.fromkeys(str(p) for p in check_paths if Path(p).resolve() not in calibrated))
    if not held_out:
        raise ValueError(
            "The int8 model is checked on images not used for calibration; give check images (check_paths) "
            "other than the calibration images."
        )
    sizes = served_sizes(sidecar)
    fp32_session = onnx_session(fp32_path)
    check_graph_against_sidecar(fp32_session, sidecar, fp32_path)
    input_name = fp32_session.get_inputs()[0].name
    calibration = [_preprocess(calibration_paths, sidecar, size) for size in sizes]
    checks = {size: _preprocess(held_out, sidecar, size) for size in sizes}

    with tempfile.TemporaryDirectory(prefix="raml-quantize-", dir=work_dir) as work, atomic_path(output) as tmp:
        prepared = Path(work) / "prepared.onnx"
        # a full disk names --output, not the staged file
        with _quiet_quantizer(), _temporary_folder(Path(work)), _writing(shown, "int8 model", write_errors_only=True):
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(tmp),
                _calibration_reader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
            )
        int8_session = onnx_session(tmp)
        by_size = {size: _cosines(_embed(fp32_session, x), _embed(int8_session, x)) for size, x in checks.items()}
        cosines = np.concatenate(list(by_size.values()))
        mean, low = float(cosines.mean()), float(cosines.min())
        per_size = {str(size): {"mean": float(c.mean()), "min": float(c.min())} for size, c in by_size.items()}
        for size, c in by_size.items():
            logger.info(
                "int8 vs fp32 at %d px on %d held-out images: mean cosine %.4f, min %.4f",
                size,
                len(c),
                c.mean(),
                c.min(),
            )
        if not (mean >= min_cosine and low >= min_worst_cosine):
            worst_size = min(by_size, key=lambda size: float(by_size[size].min()))
            raise QuantizationError(
                f"The int8 model's embeddings are too far from the fp32 model's: mean cosine similarity {mean:.4f} "
                f"(needs {min_cosine}), worst {low:.4f} at {worst_size} px (needs {min_worst_cosine}), on "
                f"{len(held_out)} images not used for calibration at sizes {', '.join(map(str, sizes))}; nothing "
                "was written. Calibrate on more (or more typical) images, or try another --calibration-method."
            )
        record = dict(sidecar)
        record["model_sha256"] = file_sha256(tmp)
        record["quantization"] = {
            "tool": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "weights": "int8" + (" per channel" if per_channel else " per tensor"),
            "activations": "uint8",
            "calibration_method": method,
            "calibration_split": calibration_split,
            "calibration_images": len(calibration_paths),
            "fp32_model": source_label if source_label is not None else str(fp32_path),
            "fp32_sha256": sidecar.get("model_sha256"),
            "mean_cosine_to_fp32": mean,
            "min_cosine_to_fp32": low,
            "checked_images": len(held_out),
            "sizes": sizes,
            "cosine_to_fp32_by_size": per_size,
        }
        int8_bytes = tmp.stat().st_size
        with _writing(sidecar_path(shown), "sidecar"):
            atomic_write_text(sidecar_path(output), json.dumps(record, indent=2) + "\n")
    fp32_bytes = fp32_path.stat().st_size
    logger.info("Wrote %s (%d bytes, fp32 %d) and %s", output, int8_bytes, fp32_bytes, sidecar_path(output))
    return QuantizationReport(
        path=output,
        sidecar=sidecar_path(output),
        source=fp32_path,
        fp32_bytes=fp32_bytes,
        int8_bytes=int8_bytes,
        calibration_images=len(calibration_paths),
        checked_images=len(held_out),
        mean_cosine=mean,
        min_cosine=low,
        method=method,
        per_channel=per_channel,
        sizes=sizes,
        cosine_by_size=per_size,
    )
