"""A module that runs a network's forward differently (another runtime, another precision) and is otherwise
that network: its train/eval mode is the network's when wrapped, and attributes the callers read from a
network (``meta``, ``pool``, ``source_path``, ...) are forwarded to it."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["NetworkWrapper"]


class NetworkWrapper(nn.Module):
    """Holds ``network`` as ``self.network``; subclasses define ``forward``.

    Args:
        network: The wrapped network.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.train(network.training)  # the wrapper's mode is the network's: callers save and restore it

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "network":
                raise
            return getattr(self.network, name)
