"""A response's head and body leave the server in one write (raml.deploy.service.connections._LingeringTransport)."""

from __future__ import annotations

import asyncio

from raml.deploy.service.connections import _JOIN_LIMIT, _LingeringTransport


class _Recorder:
    """The transport under the wrapper: records every write and the order of the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def write_eof(self) -> None:
        self.calls.append(("eof", b""))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", b""))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", b""))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"extra:{name}"


class _Protocol:
    _lingering = False

    def __init__(self, body_unread: bool = False) -> None:
        self.unread = body_unread
        self.lingered = False

    def _body_unread(self) -> bool:
        return self.unread

    def _linger(self) -> None:
        self.lingered = True


def _run(steps) -> list[tuple[str, bytes]]:
    """Run ``steps(wrapper)`` on a fresh loop, then one more loop iteration; the recorded calls."""

    async def main() -> list[tuple[str, bytes]]:
        recorder = _Recorder()
        wrapper = _LingeringTransport(recorder, _Protocol(), asyncio.get_running_loop())  # type: ignore[arg-type]
        steps(wrapper, recorder)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return recorder.calls

    return asyncio.run(main())


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n"


def test_a_response_head_and_its_body_go_out_in_one_write_at_once():
    seen: list[int] = []

    def steps(t, r):
        t.write(HEAD)
        seen.append(len(r.calls))  # the head is held...
        t.write(b'{"a": 1}')
        seen.append(len(r.calls))  # ...and goes out with the body, in the same step (no wait for the loop)

    assert _run(steps) == [("write", HEAD + b'{"a": 1}')]
    assert seen == [0, 1]


def test_a_head_without_a_body_goes_out_at_the_end_of_the_iteration():
    assert _run(lambda t, r: t.write(HEAD)) == [("write", HEAD)]


def test_any_other_write_goes_out_at_once():
    seen: list[int] = []

    def steps(t, r):
        t.write(b"5\r\nhello\r\n")  # e.g. a chunk of a streamed body
        seen.append(len(r.calls))

    assert _run(steps) == [("write", b"5\r\nhello\r\n")]
    assert seen == [1]


def test_a_large_body_is_not_copied_into_the_head():
    big = b"x" * (_JOIN_LIMIT + 1)
    calls = _run(lambda t, r: (t.write(HEAD), t.write(big)))
    assert calls == [("write", HEAD), ("write", big)]


def test_close_and_write_eof_send_what_is_held_first_and_abort_drops_it():
    assert _run(lambda t, r: (t.write(HEAD), t.close())) == [("write", HEAD), ("close", b"")]
    assert _run(lambda t, r: (t.write(HEAD), t.write_eof())) == [("write", HEAD), ("eof", b"")]
    assert _run(lambda t, r: (t.write(HEAD), t.abort())) == [("abort", b"")]


def test_nothing_is_written_to_a_transport_closed_underneath():
    def steps(t, r):
        t.write(HEAD)
        r.closing = True  # e.g. the peer reset the connection

    assert _run(steps) == []


def test_the_buffer_size_counts_what_is_held_and_other_attributes_are_the_transports():
    async def main() -> tuple[int, str]:
        wrapper = _LingeringTransport(_Recorder(), _Protocol(), asyncio.get_running_loop())  # type: ignore[arg-type]
        wrapper.write(HEAD)
        return wrapper.get_write_buffer_size(), wrapper.get_extra_info("peername")

    assert asyncio.run(main()) == (len(HEAD), "extra:peername")
