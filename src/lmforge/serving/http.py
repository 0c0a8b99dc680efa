"""uvicorn's HTTP/1.1 protocol with a deadline for each request's headers.

uvicorn times out a connection that idles between requests (its keep-alive timeout) but not one that
sends a request's headers a byte at a time ("slowloris"): such clients could hold every connection the
machine has. `HeaderDeadline` closes a connection whose request headers are not complete within
`header_timeout_s` of their first byte (or of the connection opening); the body and the response are not
timed (a long generation streams for as long as it takes).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadline(H11Protocol):
    header_timeout_s = 20.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._too_slow
        )

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._deadline is None:  # the next request's headers begin
            self._deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are complete
            self._cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
