"""Serving the emulator: in the foreground (CLI), or on a background thread (demos, tests)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import TextIO

from aiohttp import web

from emulator.app import create_app
from emulator.config import EmulatorConfig

READY_PREFIX = "EMULATOR_READY "


async def start(config: EmulatorConfig, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner (to clean up) and the base URL (real port if 0)."""
    runner = web.AppRunner(create_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        # A busy port: close what setup opened, so the caller's one-line error stays alone.
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return runner, f"http://{host}:{bound_port}"


def run(config: EmulatorConfig, host: str, port: int, out: TextIO) -> None:
    """Serve until interrupted; prints one `EMULATOR_READY <url>` line once listening."""

    async def main() -> None:
        runner, url = await start(config, host, port)
        print(f"{READY_PREFIX}{url}", file=out, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@dataclass
class ThreadedEmulator:
    """An emulator on its own event loop in a daemon thread."""

    url: str
    loop: asyncio.AbstractEventLoop
    runner: web.AppRunner
    thread: threading.Thread

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and join the thread."""
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        fut.result(timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout_s)


def serve_in_thread(
    config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0
) -> ThreadedEmulator:
    """Start the emulator on a background thread and return once it listens."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="emulator", daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(start(config, host, port), loop).result(
        timeout_s
    )
    return ThreadedEmulator(url=url, loop=loop, runner=runner, thread=thread)
