"""A TCP relay between a client and a real redis-server that can hold Redis's replies back.

Commands reach Redis at once and run there; while `hold` is set, the replies wait in the relay
until it is cleared. That is the fault a timeout cannot tell from a lost command: Redis ran
the script, and the client stopped waiting before the answer came.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from .support import free_port


class HeldReplies:
    """`async with HeldReplies(redis_port) as relay:` listens on `relay.url`."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.released = asyncio.Event()
        self.released.set()
        self.held = 0  # replies that waited for `release`
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    async def __aenter__(self) -> HeldReplies:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        for pipe in (self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True)):
            task = asyncio.create_task(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if replies and not self.released.is_set():
                    self.held += 1
                    await self.released.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
