#!/usr/bin/env python3
"""Streaming WebSocket client on Python `websockets`: receives large fragmented messages.

Usage: stream_client.py URL COUNT TIMEOUT_SECONDS

Opens COUNT connections to URL (an app endpoint that streams messages, e.g.
proxy_app.py's /stream), waits until each has received one whole message, prints
`READY`, then reads and checks every message until the server closes the connection or
TIMEOUT_SECONDS pass. Message n must equal `payload(n % 251)` (the same pseudo-random
bytes proxy_app.py sends), counting from the first message seen: a message cut, spliced
or interleaved with foreign bytes shows up as a bad message. Prints ONE JSON line, same shape as ws_client.py plus two
counts:

  {"opened":N,"closes":[{"code":1012,"reason":"...","at_ms":T},...],"still_open":k,
   "errors":[...],"messages":M,"bad_messages":B}
"""

import asyncio
import functools
import json
import random
import sys
import time

from websockets.asyncio.client import connect

import closes as closes_mod
from websockets.exceptions import ConnectionClosed

CONNECT_PARALLEL = 100
MAX_ERRORS = 50
FRAGMENTS = 8
FRAGMENT = 16 * 1024


@functools.lru_cache(maxsize=251)
def payload(k):
    return random.Random(k).randbytes(FRAGMENTS * FRAGMENT)


EXPECTED = {payload(k): k for k in range(251)}


class Session:
    def __init__(self, ws):
        self.ws = ws
        self.first = asyncio.get_running_loop().create_future()
        self.messages = 0
        self.bad = 0
        self.last = None

    def check(self, msg):
        k = EXPECTED.get(msg)
        follows = self.last is None or (k is not None and k == (self.last + 1) % 251)
        if k is None or not follows:
            self.bad += 1
        self.last = k
        self.messages += 1
        if not self.first.done():
            self.first.set_result(None)

    async def read(self):
        try:
            async for msg in self.ws:
                self.check(msg)
        except ConnectionClosed:
            pass


async def open_one(i, url, timeout, sem, errors):
    async with sem:
        try:
            ws = await connect(url, open_timeout=timeout, close_timeout=10, max_size=2**22)
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            errors.append(f"conn {i}: connect failed: {type(exc).__name__}: {exc}")
            return None
        s = Session(ws)
        s.task = asyncio.ensure_future(s.read())
        try:
            await asyncio.wait_for(asyncio.shield(s.first), timeout)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"conn {i}: no message: {type(exc).__name__}: {exc}")
            ws.transport.abort()
            return None
        return s


async def main():
    if len(sys.argv) != 4:
        print("usage: stream_client.py URL COUNT TIMEOUT_SECONDS", file=sys.stderr)
        sys.exit(2)
    url, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    errors = []
    sem = asyncio.Semaphore(CONNECT_PARALLEL)
    opening = [asyncio.ensure_future(open_one(i, url, timeout, sem, errors)) for i in range(count)]
    done, pending = await asyncio.wait(opening, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        errors.append(f"{len(pending)} connections not open after {timeout}s")
    sessions = [t.result() for t in done if not t.cancelled() and t.result() is not None]

    ready_at = time.monotonic()
    print("READY", flush=True)

    async def closed(s):
        await s.task
        return s.ws

    closes, still_open = await closes_mod.collect([closed(s) for s in sessions], ready_at, timeout)
    for s in sessions:
        s.ws.transport.abort()
    if len(errors) > MAX_ERRORS:
        errors = errors[:MAX_ERRORS] + [f"... {len(errors) - MAX_ERRORS} more"]
    print(
        json.dumps(
            {
                "opened": len(sessions),
                "closes": closes,
                "still_open": still_open,
                "errors": errors,
                "messages": sum(s.messages for s in sessions),
                "bad_messages": sum(s.bad for s in sessions),
            },
            separators=(",", ":"),
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
