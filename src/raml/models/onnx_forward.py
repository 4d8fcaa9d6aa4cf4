"""An fp32 ONNX Runtime twin of a network's forward pass, for inference on the CPU, checked against the network.

Contract: ``OrtForward(network)(images)`` maps ``(B, 3, H, W)`` float32 CPU images to what ``network(images)``
returns (``(B, D)`` float32), computed by onnxruntime's CPU execution provider from the network's own weights.
Why: on this project's 2-core AMD EPYC (AVX2, no AVX-512) onnxruntime ran the ResNet-50 + GeM + whitening
forward ~2x faster than PyTorch's eager fp32 forward, with embeddings within 1e-7 (docs/benchmarks.md).

- **One graph per input size.** The first batch of each ``(H, W)`` exports the network (the TorchScript-based
  ``torch.onnx.export``, dynamic batch axis only) into memory and opens a session on it. A traced graph fixes
  whatever Python decides from the input's shape (per-size BatchNorm statistics, a timm trunk's grid size) to
  that shape, so a graph never serves another size. The export costs seconds per size (ResNet-50: ~4 s on an
  idle core, more under load): :attr:`OrtForward.export_seconds` sums it, and it pays for itself from a few
  batches on.
- **Only when it pays.** With ``warmup_pixels`` > 0, each size first runs the network's own forward until
  that many pixels (batch x height x width, summed) went through it, and exports only then: a job too small to
  repay the export never pays it, a large one spends at most about the export's cost in the slower forward
  first (the rent-or-buy rule). :data:`AUTO_WARMUP_PIXELS` is 32 images at 224 px, about one ResNet-50 export
  in eager forward time on this project's CPU. When the caller knows a job's size (:meth:`OrtForward.expect`,
  called by ``extract_embeddings``), the choice is made up front instead: a job of at least twice the warm-up
  exports on its first batch, a smaller one runs in PyTorch to its end.
- **Checked before use.** On the first batch of each size, the first ``check_images`` images go through both
  the network and the session; if their outputs differ by more than ``tolerance`` (max abs, default 1e-4)
  or the export fails, that size runs the network's own forward from then on (``strict=False``, with a
  warning) or raises :class:`OrtParityError` (``strict=True``).
- **Only where it is the same computation.** Inputs that are not float32 on the CPU, calls with gradients
  enabled and calls under autocast go to the network itself, so training and reduced-precision paths are
  untouched.

Attributes the callers read from a network (``meta``, ``pool``, ``source_path``, ``output_dim``, ...) are
forwarded to the wrapped network. The weights are read once per size, at export: build the wrapper after the
weights are final (a CLI command's lifetime), never around a network that is still being trained.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from raml.models.forward_wrapper import NetworkWrapper

logger = logging.getLogger(__name__)

__all__ = ["AUTO_WARMUP_PIXELS", "OrtForward", "OrtParityError", "onnxruntime_available"]

_INPUT, _OUTPUT = "images", "embeddings"

#: Pixels each size runs in PyTorch before ``OrtForward(warmup_pixels=...)`` exports it (32 images at 224 px).
AUTO_WARMUP_PIXELS = 32 * 224 * 224
_OPSET = 17


class OrtParityError(RuntimeError):
    """The onnxruntime graph of a network could not be built or does not reproduce the network's outputs."""


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no busy-waiting between operators: the loader's worker processes need those cycles on a small machine
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _size_key(images: torch.Tensor) -> tuple[int, int, int]:
    return (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))


def _size_text(key: tuple[int, int, int]) -> str:
    return f"{key[1]}x{key[2]}"


class OrtForward(NetworkWrapper):
    """``network``'s forward pass run by onnxruntime in fp32 on the CPU (see the module docstring).

    Args:
        network: The network, on the CPU; put in eval mode for the export (its mode is restored after).
        threads: onnxruntime intra-op threads; None = ``torch.get_num_threads()`` when the session is made,
            the same number the eager forward would use.
        tolerance: Largest absolute difference from the network's own output accepted on the check images.
        check_images: Images of the first batch of each size compared with the network's own forward.
        strict: Raise :class:`OrtParityError` when the export fails or the check does not pass, instead of
            falling back to the network's forward for that size.
        warmup_pixels: Pixels of each size run by the network itself before that size is exported (0: export
            on the first batch).

    Attributes:
        network: The wrapped network.
        export_seconds: Seconds spent exporting and opening sessions (and on the check), all sizes together.
        checks: Per input size ``(C, H, W)``: the max abs difference of the check, or None when the export failed.

    Raises:
        ImportError: onnxruntime is not installed.
        ValueError: ``tolerance`` or ``check_images`` out of range.
    """

    def __init__(
        self,
        network: nn.Module,
        threads: int | None = None,
        tolerance: float = 1e-4,
        check_images: int = 2,
        strict: bool = False,
        warmup_pixels: int = 0,
    ) -> None:
        super().__init__(network)
        if not onnxruntime_available():
            raise ImportError("The onnxruntime CPU runtime needs onnxruntime: `pip install onnxruntime`.")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
        if check_images < 1:
            raise ValueError(f"check_images must be at least 1, got {check_images}")
        if warmup_pixels < 0:
            raise ValueError(f"warmup_pixels must be >= 0, got {warmup_pixels}")
        self.threads = threads
        self.tolerance = float(tolerance)
        self.check_images = int(check_images)
        self.strict = strict
        self.warmup_pixels = int(warmup_pixels)
        self.export_seconds = 0.0
        self._warmup: dict[tuple[int, int, int], int] = {}  # pixels run by the network so far, per size
        self._threshold: dict[tuple[int, int, int], int] = {}  # per size, when a job's size raised the warm-up
        self.checks: dict[tuple[int, int, int], float | None] = {}
        self._sessions: dict[tuple[int, int, int], Any] = {}  # None = this size runs the network itself

    def __deepcopy__(self, memo: dict) -> OrtForward:
        raise TypeError(
            "An OrtForward holds onnxruntime sessions, which cannot be copied; copy the network it wraps "
            "(`.network`) and wrap the copy."
        )

    def _uses_session(self, images: torch.Tensor) -> bool:
        return (
            images.device.type == "cpu"
            and images.dtype == torch.float32
            and images.dim() == 4
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
        )

    def _export(self, channels: int, height: int, width: int) -> bytes:
        """The network as an ONNX model for ``(B, channels, height, width)`` inputs, in memory."""
        buffer = io.BytesIO()
        was_training = self.network.training
        self.network.eval()
        try:
            # the export traces the network: outside inference mode (its tensors cannot be traced), no gradients
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                example = torch.zeros(1, channels, height, width)
                torch.onnx.export(
                    self.network,
                    (example,),
                    buffer,
                    dynamo=False,
                    opset_version=_OPSET,
                    input_names=[_INPUT],
                    output_names=[_OUTPUT],
                    dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
                    do_constant_folding=False,  # onnxruntime folds (and fuses Conv + BN) itself: half the export time
                )
        finally:
            self.network.train(was_training)
        return buffer.getvalue()

    def _run(self, session: Any, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.numpy())
        return torch.from_numpy(session.run(None, {_INPUT: batch})[0])

    def _prepare(self, images: torch.Tensor) -> Any:
        """Export, open and check the session of this batch's size; None when the network runs it instead."""
        key = _size_key(images)
        start = time.perf_counter()
        sample = images[: self.check_images]
        try:
            session = _session(self._export(*key), self.threads or torch.get_num_threads())
            got = self._run(session, sample)  # a graph that lost its input fails here, not at export
        except Exception as error:  # noqa: BLE001 - the exporter and onnxruntime raise many types
            self.checks[key] = None
            self.export_seconds += time.perf_counter() - start
            message = f"cannot run this network with onnxruntime at {_size_text(key)} ({type(error).__name__}: {error})"
            if self.strict:
                raise OrtParityError(message + "; use the torch runtime (--cpu-runtime torch).") from error
            logger.warning("%s; using PyTorch's forward for this size.", message)
            return None
        expected = self.network(sample).float()
        diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
        self.checks[key] = diff
        self.export_seconds += time.perf_counter() - start
        if not diff <= self.tolerance:  # also catches NaN
            message = (
                f"onnxruntime's output differs from the network's by {diff:.3g} (more than {self.tolerance:g}) at "
                f"{_size_text(key)}"
            )
            if self.strict:
                raise OrtParityError(message + "; use the torch runtime (--cpu-runtime torch).")
            logger.warning("%s; using PyTorch's forward for this size.", message)
            return None
        logger.info(
            "onnxruntime fp32 forward at %s: export + session %.1f s, max |ort - torch| %.2e on %d images",
            _size_text(key),
            time.perf_counter() - start,
            diff,
            sample.shape[0],
        )
        return session

    def expect(self, shape: tuple[int, int, int], images: int) -> None:
        """A job of ``images`` inputs of ``shape`` ``(C, H, W)`` starts: with a warm-up, decide for it now.

        At least twice the warm-up's pixels: the size is exported on the job's first batch. Fewer: the job runs
        in PyTorch to its end (the warm-up is raised past it). Without a warm-up, or for a size already decided,
        nothing changes.
        """
        key = (int(shape[0]), int(shape[1]), int(shape[2]))
        if self.warmup_pixels == 0 or key in self._sessions:
            return
        seen = self._warmup.get(key, 0)
        pixels = int(images) * key[1] * key[2]
        if pixels >= 2 * self.warmup_pixels:
            self._threshold[key] = seen
        else:
            self._threshold[key] = max(self._threshold.get(key, self.warmup_pixels), seen + pixels + 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the network's output, from onnxruntime where it applies (module docstring)."""
        if not self._uses_session(images):
            return self.network(images)
        key = _size_key(images)
        if key not in self._sessions:
            seen = self._warmup.get(key, 0)
            if seen < self._threshold.get(key, self.warmup_pixels):
                self._warmup[key] = seen + images.shape[0] * images.shape[2] * images.shape[3]
                return self.network(images)
            self._sessions[key] = self._prepare(images)
        session = self._sessions[key]
        if session is None:
            return self.network(images)
        return self._run(session, images)

    def extra_repr(self) -> str:
        return f"tolerance={self.tolerance:g}, sizes={sorted(k for k, s in self._sessions.items() if s is not None)}"
