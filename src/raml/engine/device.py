"""The training device: mixed precision (``--amp``) and the CUDA settings chosen once at the entry point.

Which parts run in bf16 under ``--amp``: only the student's forward pass (and, through autograd, its
backward), wrapped by :class:`AutocastForward`; its ``(B, D)`` embeddings come back as float32. The teacher's
forward pass, every loss (similarity matrices included) and every evaluation run in float32: the training
targets are then the same numbers as the teacher's fp32 test database, and no similarity of a loss is rounded
to bf16's 8-bit mantissa (under autocast ``matmul``/``bmm``/``einsum`` are re-cast to bf16 even on float32
inputs, so casting the embeddings to float is not enough).

``--amp`` runs where bf16 is native: CUDA GPUs of compute capability 8.0 or newer (A100, H100, RTX 30xx,
...). Older GPUs (V100, T4) only emulate bf16, slower than float32, so :func:`check_amp_device` refuses
them. On the CPU ``--amp`` is ignored (float32) with a log line.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["AMP_DEVICE_TYPES", "AutocastForward", "amp_active", "check_amp_device", "prepare_cuda_device"]

#: device types on which ``--amp`` autocasts the student's forward pass (tests add "cpu" to run the path)
AMP_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

#: the first CUDA compute capability with native bf16 (Ampere)
NATIVE_BF16_CAPABILITY = (8, 0)


class AutocastForward(nn.Module):
    """Run ``network``'s forward pass under bf16 autocast and return float32 outputs.

    Only this forward (and its backward) runs in bf16; whatever uses the outputs (the losses) runs outside
    autocast in float32.

    Args:
        network: The module to run, ``(B, 3, H, W) -> (B, D)``.
        device_type: The autocast device type (``"cuda"``, ``"cpu"``).
    """

    def __init__(self, network: nn.Module, device_type: str) -> None:
        super().__init__()
        self.network = network
        self.device_type = device_type

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.network(images)
        return out.float()


def check_amp_device(device: torch.device) -> None:
    """Refuse ``--amp`` on a CUDA GPU without native bf16 (compute capability below 8.0).

    Raises:
        ValueError: the GPU would emulate bf16, slower than float32; the message says what to do.
    """
    if device.type != "cuda":
        return
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < NATIVE_BF16_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"--amp trains in bf16, which {name} (compute capability {capability[0]}.{capability[1]}) does not "
            "support natively: it would be emulated and run slower than float32. Train without --amp on this GPU "
            "(bf16 is native from compute capability 8.0: A100, H100, RTX 30xx and newer)."
        )


def amp_active(amp: bool, device: torch.device) -> bool:
    """Whether ``--amp`` autocasts on ``device``: asked for and the device type supports it (see module doc).

    Raises:
        ValueError: ``--amp`` on a GPU without native bf16 (:func:`check_amp_device`).
    """
    if not amp:
        return False
    if device.type not in AMP_DEVICE_TYPES:
        logger.info("--amp: bf16 autocast runs on CUDA only; training on %s in float32.", device)
        return False
    check_amp_device(device)
    return True


def prepare_cuda_device(device: torch.device, amp: bool = False) -> None:
    """The entry point's CUDA settings for training on ``device`` (nothing for other devices).

    - ``torch.cuda.set_device(device)``: otherwise the pin-memory thread and any ``torch.cuda`` call without an
      explicit device make a context on GPU 0, even with ``-g 1``.
    - ``cudnn.benchmark`` on, since a run's input sizes are fixed per batch, unless deterministic algorithms
      were asked for (``torch.use_deterministic_algorithms(True)``): benchmarking picks algorithms by timing.
    - ``--amp`` checked against the GPU (:func:`check_amp_device`).

    Raises:
        ValueError: ``--amp`` on a GPU without native bf16.
    """
    if device.type != "cuda":
        return
    if amp:
        check_amp_device(device)
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    logger.info(
        "CUDA device %s (%s); cudnn.benchmark %s",
        device,
        torch.cuda.get_device_name(device),
        torch.backends.cudnn.benchmark,
    )
