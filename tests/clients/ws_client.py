#!/usr/bin/env python3
"""WebSocket test client built on the Python `websockets` library (asyncio API).

Usage: ws_client.py URL COUNT TIMEOUT_SECONDS [ignore-close]

Opens COUNT connections to URL, sends one message on each and checks the echo, prints
`READY` once the opening phase is over (connections that failed are listed in
"errors"), then waits until the server has closed every connection or TIMEOUT_SECONDS
pass (TIMEOUT_SECONDS also bounds the opening phase). Prints ONE JSON line:

  {"opened":N,"closes":[{"code":1012,"reason":"...","at_ms":T},...],"still_open":k,
   "errors":[...]}

at_ms counts from READY (0 if the close came before). A connection that ended without a
close frame from the server reports code 1006. Exit status is 0 whenever the run itself
worked; callers judge the JSON.

ignore-close: the client does not answer the server's close frame and keeps the TCP
connection open, like a client that ignores closes. websockets has no option for this,
so the script drops the automatic close reply the library would send (it wraps
`protocol.send_frame`) and disables the library's own close timeout; the connection then
ends only when the server drops the TCP connection. The close frame's code is still
reported (websockets records the close frame it received), at the time the TCP ended.
"""

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect

import closes as closes_mod
from websockets.frames import Opcode

# Connect in small waves so thousands of clients don't hit the accept queue at once.
CONNECT_PARALLEL = 100
MAX_ERRORS = 50


def usage():
    print("usage: ws_client.py URL COUNT TIMEOUT_SECONDS [ignore-close]", file=sys.stderr)
    sys.exit(2)


def drop_close_replies(ws):
    """Makes the library skip sending close frames on this connection."""
    protocol = ws.protocol
    original = protocol.send_frame

    def send_frame(frame):
        if frame.opcode is Opcode.CLOSE:
            return
        original(frame)

    protocol.send_frame = send_frame


async def open_one(i, url, timeout, ignore_close, sem, errors):
    async with sem:
        try:
            ws = await connect(
                url,
                open_timeout=timeout,
                close_timeout=None if ignore_close else 10,
            )
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
            errors.append(f"conn {i}: connect failed: {type(exc).__name__}: {exc}")
            return None
        try:
            text = f"hello {i}"
            await ws.send(text)
            echo = await asyncio.wait_for(ws.recv(), timeout)
            if echo != text:
                errors.append(f"conn {i}: echo mismatch: sent {text!r}, got {echo!r}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"conn {i}: echo failed: {type(exc).__name__}: {exc}")
            ws.transport.abort()
            return None
        if ignore_close:
            drop_close_replies(ws)
        return ws


async def main():
    if len(sys.argv) not in (4, 5):
        usage()
    url = sys.argv[1]
    try:
        count = int(sys.argv[2])
        timeout = float(sys.argv[3])
    except ValueError:
        usage()
    ignore_close = len(sys.argv) == 5
    if ignore_close and sys.argv[4] != "ignore-close":
        usage()

    errors = []
    sem = asyncio.Semaphore(CONNECT_PARALLEL)
    started = time.monotonic()
    opening = [
        asyncio.ensure_future(open_one(i, url, timeout, ignore_close, sem, errors))
        for i in range(count)
    ]
    done, pending = await asyncio.wait(opening, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        errors.append(
            f"{len(pending)} connections not open after {timeout}s "
            f"(opening took {time.monotonic() - started:.1f}s)"
        )
    conns = [t.result() for t in done if not t.cancelled() and t.result() is not None]

    ready_at = time.monotonic()
    print("READY", flush=True)

    closes, still_open = await closes_mod.collect([asyncio.sleep(0, ws) for ws in conns], ready_at, timeout)
    for ws in conns:
        ws.transport.abort()

    if len(errors) > MAX_ERRORS:
        errors = errors[:MAX_ERRORS] + [f"... {len(errors) - MAX_ERRORS} more"]
    print(
        json.dumps(
            {"opened": len(conns), "closes": closes, "still_open": still_open, "errors": errors},
            separators=(",", ":"),
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
