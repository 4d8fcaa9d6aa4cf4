"""Which ``Host`` a request to ``raml serve`` may name, and which ``Origin`` may POST to it (DNS rebinding).

A web page on ``http://attacker.test:PORT/`` whose name the attacker's DNS server then resolves to 127.0.0.1 is,
for the browser, the same origin as the attacker's page: its scripts read the answers of a service bound to
loopback. The requests still say ``Host: attacker.test:PORT``; the service answers only names it knows
(:class:`HostRules`): the loopback names, the address it is bound to when that is a specific one, and the names
given with ``raml serve --allowed-host``. A cross-origin ``POST`` (a "simple" request that a browser sends
without asking first) is refused when its ``Origin`` names another host than its ``Host``.

Standard library only (the CLI checks ``--allowed-host`` before loading anything).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = [
    "ANY_HOST",
    "LOOPBACK_NAMES",
    "HostRules",
    "allowed_host_name",
    "bind_host_name",
    "binds_every_interface",
    "parse_host_header",
]

#: the names of this machine's loopback interface, always allowed
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
#: ``--allowed-host *``: any ``Host`` (behind a proxy that checks it itself)
ANY_HOST = "*"
_WILDCARD_BINDS = ("", "0.0.0.0", "::")
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _ip_or_name(text: str) -> str | None:
    """``text`` (lower case, no brackets, no trailing dot) as an IP address in its short form or a DNS name;
    None when it is neither."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text if _NAME.fullmatch(text) else None


def binds_every_interface(bind_host: str) -> bool:
    """Whether a server bound to ``bind_host`` listens on every interface (``0.0.0.0``, ``::`` or empty): no name
    of its own to allow, and no URL to give but the loopback's."""
    return bind_host.strip() in _WILDCARD_BINDS


def allowed_host_name(value: str) -> str:
    """An ``--allowed-host`` entry normalised (lower case; an IPv6 address without brackets), or ``*``.

    Raises:
        ValueError: not a host name or an IP address (e.g. one with a port or a scheme).
    """
    text = value.strip().lower()
    if text == ANY_HOST:
        return ANY_HOST
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    name = _ip_or_name(text.rstrip(".")) if text else None
    if name is None:
        raise ValueError(
            f"--allowed-host {value!r} is not a host name or an IP address; give the name clients use, without a "
            "scheme or port (e.g. --allowed-host search.example.org), or * for any."
        )
    return name


def bind_host_name(value: str) -> str:
    """``--host`` (the address the server binds) normalised as by :func:`allowed_host_name`, for the names a
    service answers.

    Raises:
        ValueError: not a host name or an IP address (e.g. one with a scheme or a port), or ``*``; the message
            names ``--host``.
    """
    text = value.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    name = _ip_or_name(text.rstrip(".")) if text and text != ANY_HOST else None
    if name is None:
        raise ValueError(
            f"--host {value!r} is not an IP address or a host name to bind; give one without a scheme or port "
            "(e.g. --host 127.0.0.1, or --host 0.0.0.0 for every interface; the port is --port)."
        )
    return name


def parse_host_header(value: str) -> tuple[str, int | None] | None:
    """A ``Host`` header's (name, port): the name normalised as by :func:`allowed_host_name`; None if malformed."""
    text = value.strip().lower()
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
        else:
            port_text = None
    else:
        name, colon, after = text.partition(":")
        port_text = after if colon else None
    if port_text is not None:
        if not (port_text.isdigit() and len(port_text) <= 5):
            return None
        port = int(port_text)
    normalised = _ip_or_name(name.rstrip(".")) if name else None
    return None if normalised is None else (normalised, port)


class HostRules:
    """The ``Host`` names a service answers and the check of a request's ``Origin``.

    Args:
        extra: Names allowed besides the loopback names (``--allowed-host``; ``*``: any host).
        bind_host: The address the server is bound to; allowed too unless it is every interface (0.0.0.0, ::).

    Raises:
        ValueError: an entry of ``extra`` that is not a host name (see :func:`allowed_host_name`), or a
            ``bind_host`` that is not one (see :func:`bind_host_name`).
    """

    def __init__(self, extra: Iterable[str] = (), bind_host: str | None = None) -> None:
        names = {allowed_host_name(name) for name in extra}
        self.any_host = ANY_HOST in names
        names.discard(ANY_HOST)
        names.update(LOOPBACK_NAMES)
        if bind_host is not None and not binds_every_interface(bind_host):
            names.add(bind_host_name(bind_host))
        self.names = frozenset(names)

    def describe(self) -> list[str]:
        """The allowed names, sorted (``["*"]`` for any)."""
        return [ANY_HOST] if self.any_host else sorted(self.names)

    def allows_host(self, header: str | None) -> bool:
        """Whether a request with this ``Host`` header is answered (no header: an HTTP/1.0 client; not a browser,
        which always sends one)."""
        if header is None or self.any_host:
            return True
        parsed = parse_host_header(header)
        return parsed is not None and parsed[0] in self.names

    @staticmethod
    def same_origin(origin: str, host_header: str | None) -> bool:
        """Whether ``origin`` (an ``Origin`` header) names the host and port of ``host_header`` (a request's
        ``Host``). A ``Host`` without a port matches the origin's scheme's default port (80 or 443: behind a
        TLS proxy the origin is https while the service speaks http)."""
        if host_header is None:
            return False
        parsed = parse_host_header(host_header)
        try:
            split = urlsplit(origin.strip())
            origin_port = split.port
        except ValueError:
            return False
        if parsed is None or split.scheme not in _DEFAULT_PORTS or not split.hostname:
            return False
        origin_name = _ip_or_name(split.hostname.lower().rstrip("."))
        if origin_port is None:
            origin_port = _DEFAULT_PORTS[split.scheme]
        name, port = parsed
        if name != origin_name:
            return False
        return port == origin_port if port is not None else origin_port in _DEFAULT_PORTS.values()

    @staticmethod
    def port_dropped(origin: str, host_header: str | None) -> bool:
        """Whether ``host_header`` names ``origin``'s host without a port while the origin has a port other than
        its scheme's default: what a reverse proxy sends when it replaces the client's ``Host`` by the name
        alone (nginx's ``$host``), so that a page served on another port is refused as cross-origin."""
        parsed = parse_host_header(host_header) if host_header is not None else None
        try:
            split = urlsplit(origin.strip())
            origin_port = split.port
        except ValueError:
            return False
        if parsed is None or parsed[1] is not None or origin_port is None or not split.hostname:
            return False
        return parsed[0] == _ip_or_name(split.hostname.lower().rstrip(".")) and origin_port != _DEFAULT_PORTS.get(
            split.scheme
        )
