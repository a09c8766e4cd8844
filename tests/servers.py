"""Servers for tests: a grpc.aio Server on an event loop of its own in this process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gateway.app import HTTPServer
from unclip.serving import Server


class BackgroundServer:
    """Runs a Server on its own event loop in a thread: for tests and benchmarks in one process.

    Entering binds and starts the server and (unless `wait_ready=False`) waits for its model.
    """

    def __init__(self, make_server: Callable[[], Server], *, wait_ready: bool = True):
        self._make_server = make_server
        self._wait_ready = wait_ready
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._startup: concurrent.futures.Future | None = None
        self.server: Server | None = None

    def __enter__(self) -> Server:
        self._thread.start()

        async def create() -> Server:
            return self._make_server()

        self.server = asyncio.run_coroutine_threadsafe(create(), self._loop).result(timeout=60)
        self._startup = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop)
        if self._wait_ready:
            self.wait_ready()
        return self.server

    def wait_ready(self, timeout: float = 300.0) -> None:
        self._startup.result(timeout=timeout)

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run `callback` on the server's event loop (that loop's objects are not thread-safe)."""
        self._loop.call_soon_threadsafe(callback)

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self._startup.cancel()
            asyncio.run_coroutine_threadsafe(self.server.stop(0.5), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


@contextlib.contextmanager
def serve_all_process(
    args: list[str], port: int, *, env: dict[str, str] | None = None, timeout: float = 240.0, stop_timeout: float = 60.0
) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`unclip serve all --port PORT ARGS` until the block ends: yields the launcher's process and
    every line its five processes print, read as it comes (a pipe nobody reads would fill up and
    block them), once the gateway on 127.0.0.1:PORT answers SERVING."""
    from unclip.launcher import check_health

    process = subprocess.Popen(
        [sys.executable, "-m", "unclip", "serve", "all", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not check_health(f"127.0.0.1:{port}", timeout=1.0):
            if process.poll() is not None:
                reader.join(timeout=10)
                pytest.fail("unclip serve all exited early:\n" + "".join(output))
            if time.monotonic() > deadline:
                pytest.fail(f"unclip serve all did not become healthy in {timeout:.0f} s:\n" + "".join(output[-60:]))
            time.sleep(0.5)
        yield process, output
    finally:
        if process.poll() is None:
            # SIGTERM first: the launcher stops its services (they run in sessions of their own,
            # so killing the launcher alone would leave them running).
            process.terminate()
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)


class ServerThread:
    """An ASGI app on 127.0.0.1, port chosen by the OS, in its own event loop: the SDK is sync."""

    def __init__(self, app) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.http = HTTPServer(app, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        return self.http.port

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.http.start(), self.loop).result(timeout=10)

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.http.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
