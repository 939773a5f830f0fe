"""A TCP fault proxy for network tests: put it between workers and Redis.

    proxy = FaultProxy(redis_port).start()     # listens on 127.0.0.1:proxy.port
    proxy.latency = 0.05                       # every chunk waits 50 ms, both ways
    proxy.blackhole = True                     # bytes are swallowed; connections stay open
    proxy.reset()                              # every open connection gets a TCP RST
    proxy.heal()                               # back to a clean pipe

It runs its own event loop in a daemon thread, so tests (and the processes
under test) can be synchronous or asynchronous. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading

from tests.redis_server import free_port


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``, with injectable faults."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        #: Seconds each chunk is held before it is forwarded.
        self.latency = 0.0
        #: Swallow every byte in both directions (a partition that drops, not refuses).
        self.blackhole = False
        #: Connections accepted so far (reconnects show up here).
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fault-proxy")

    def start(self) -> FaultProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(timeout=5)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def heal(self) -> None:
        """No latency, no blackhole: bytes flow again on every connection."""
        self.latency = 0.0
        self.blackhole = False

    def reset(self) -> None:
        """Abort every open connection with a TCP RST (both sides see ECONNRESET)."""
        asyncio.run_coroutine_threadsafe(self._reset(), self._loop).result(timeout=5)

    async def _reset(self) -> None:
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            await self._reset()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, upstream_writer))
        await asyncio.gather(
            self._pump(client_reader, upstream_writer, client_writer),
            self._pump(upstream_reader, client_writer, upstream_writer),
            return_exceptions=True,
        )

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, peer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                if self.latency:
                    await asyncio.sleep(self.latency)
                if self.blackhole:
                    continue
                sink.write(chunk)
                await sink.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            # One side closed: close the other, as a plain TCP path would.
            for writer in (sink, peer):
                self._writers.discard(writer)
                with contextlib.suppress(Exception):
                    writer.close()
