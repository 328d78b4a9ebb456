"""An event loop in a daemon thread, for emulators whose servers run beside the tests' own threads."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web


async def serve_app(app: web.Application, port: int = 0,
                    ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1:``port`` (0: a free one); its runner (``cleanup()`` ends it) and port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    return runner, int(runner.addresses[0][1])


class LoopThread:
    """Runs ``startup`` on a new loop in its own thread and keeps the loop serving until ``stop``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None

    def start(self, startup: Callable[[], Awaitable[None]], what: str, timeout: float = 60) -> None:
        """Return once ``startup`` has run on the loop; raise (naming ``what``) when it failed."""
        loop = asyncio.new_event_loop()
        ready: list[BaseException | None] = []
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(startup())
                ready.append(None)
            except BaseException as exc:  # reported to start()'s caller
                ready.append(exc)
            started.set()
            if ready[0] is None:
                loop.run_forever()

        thread = threading.Thread(target=run, name=self.name, daemon=True)
        thread.start()
        started.wait(timeout)
        if not ready or ready[0] is not None:
            thread.join(5)
            if not loop.is_running():
                loop.close()
            raise RuntimeError(f"{what} failed to start") from (ready[0] if ready else None)
        self.loop, self.thread = loop, thread

    def stop(self, shutdown: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
        """Run ``shutdown`` on the loop (``timeout`` seconds at most), then stop the loop and its thread;
        idempotent."""
        loop, thread = self.loop, self.thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            self.thread = None
            if not loop.is_running():
                loop.close()
                self.loop = None
