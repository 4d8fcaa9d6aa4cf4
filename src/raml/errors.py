"""Exceptions shared by several layers of raml.

The lowest layer (beside :mod:`raml.utils`): any package may import it, it imports nothing of raml. An error
raised by two packages that must not know each other (``raml.data`` fetching datasets, ``raml.models``
fetching weights) is defined here.
"""

from __future__ import annotations

__all__ = ["DownloadError"]


class DownloadError(OSError):
    """A file (a dataset archive, a published network, a backbone's ImageNet weights) could not be downloaded."""
