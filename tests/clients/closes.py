"""What the test clients share: waiting for the server to close each connection, and
the closes as the clients report them (code, reason, ms after READY)."""

import asyncio
import time


async def collect(closing, ready_at, timeout):
    """Waits up to `timeout` s for each awaitable in `closing`, which yields a websocket,
    to be closed. Returns the closes in time order and how many stayed open."""
    closes = []

    async def watch(c):
        ws = await c
        await ws.wait_closed()
        at_ms = max(0, round((time.monotonic() - ready_at) * 1000))
        closes.append({"code": ws.close_code, "reason": ws.close_reason or "", "at_ms": at_ms})

    watchers = [asyncio.ensure_future(watch(c)) for c in closing]
    still_open = 0
    if watchers:
        _, waiting = await asyncio.wait(watchers, timeout=timeout)
        still_open = len(waiting)
        for task in waiting:
            task.cancel()
    closes.sort(key=lambda c: c["at_ms"])
    return closes, still_open
