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

    def __init__(self, redis_port: int, *, stall: int = 0) -> None:
        self.redis_port = redis_port
        self.stall = stall  # the first `stall` connections are accepted and never answered
        self.connections = 0
        self.upstream_errors: list[str] = []
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.released = asyncio.Event()
        self.released.set()
        self.held = 0  # replies that waited for `release`
        self._passes = 0  # held replies `let_one_through` lets go while holding the rest
        self._changed = asyncio.Event()  # set on each reply held and each pass or release
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()
        self._changed.set()

    def let_one_through(self) -> None:
        """Let one held reply go on (or the next one held, if none is), and keep holding the
        rest."""
        self._passes += 1
        self._changed.set()

    async def reply_held(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until `count` replies in all have been held back (so their commands have run in
        Redis), at most `timeout` seconds."""

        async def held() -> None:
            while self.held < count:
                await self._next_change()

        try:
            await asyncio.wait_for(held(), timeout)
        except asyncio.TimeoutError:
            held_now = f"{self.held} of {count} replies held"
            raise AssertionError(f"{held_now} within {timeout} s") from None

    async def _next_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

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
        if exc is not None and hasattr(exc, "add_note"):  # Python 3.11 and newer
            exc.add_note(await self._report())
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections <= self.stall:
            self._pipes.add(asyncio.create_task(self._swallow(reader, writer)))
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        except OSError as error:
            self.upstream_errors.append(repr(error))
            # The client sees its connection closed (and tries again) instead of waiting on
            # one that nobody will ever answer.
            writer.close()
            raise
        for pipe in (self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True)):
            task = asyncio.create_task(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _report(self) -> str:
        """What the relay saw, and how fast Redis answers now, for a failed test's report."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.redis_port), 2.0
            )
            writer.close()
            redis = f"Redis accepted a connection in {loop.time() - started:.3f} s"
        except (OSError, asyncio.TimeoutError) as error:
            redis = f"Redis did not accept a connection: {error!r}"
        return (
            f"relay: {self.connections} connections, {self.held} replies held, "
            f"upstream errors {self.upstream_errors}; {redis}"
        )

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _my_turn(self) -> None:
        """Wait for `release`, or for a pass from `let_one_through`, taking it."""
        while not self.released.is_set():
            if self._passes:
                self._passes -= 1
                return
            await self._next_change()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if replies and not self.released.is_set():
                    self.held += 1
                    self._changed.set()
                    await self._my_turn()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
