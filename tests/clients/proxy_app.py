#!/usr/bin/env python3
"""A WebSocket app no one in this project wrote the server of: Python `websockets`, no
admin API. It is what proxy mode is for: the agent has no way to ask it to close.

Usage: proxy_app.py HOST PORT

- `GET /healthz` (plain HTTP): 200 "ok".
- WebSocket on `/stream`: sends large fragmented messages without pause between them:
  FRAGMENTS frames of FRAGMENT bytes each, a short sleep between frames; message n is
  `payload(n % 251)`, pseudo-random bytes (so compression cannot shrink the frames), which
  the client regenerates and compares.
- WebSocket on any other path: echo.
- permessage-deflate is negotiated when the client offers it (the library's default),
  so compressed frames (RSV1) cross the proxy.
- Prints `LISTENING` once bound, then one JSON line per ended session:
  {"path": "/stream", "code": 1001, "t": <unix time, seconds>}; `code` is the close code
  the app received (1006: the TCP ended without a close frame).
"""

import asyncio
import http
import json
import random
import sys
import time

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

FRAGMENTS = 8
FRAGMENT = 16 * 1024
FRAME_GAP = 0.02


def payload(k):
    """Message k's bytes; stream_client.py has the same function."""
    return random.Random(k).randbytes(FRAGMENTS * FRAGMENT)


async def fragments(n):
    data = payload(n % 251)
    for i in range(FRAGMENTS):
        yield data[i * FRAGMENT : (i + 1) * FRAGMENT]
        await asyncio.sleep(FRAME_GAP)


async def handler(ws):
    path = ws.request.path
    try:
        if path == "/stream":
            n = 0
            while True:
                await ws.send(fragments(n))
                n += 1
        else:
            async for msg in ws:
                await ws.send(msg)
    except ConnectionClosed:
        pass
    finally:
        await ws.wait_closed()
        code = ws.close_code if ws.close_code is not None else 1006
        print(json.dumps({"path": path, "code": code, "t": time.time()}), flush=True)


def health(connection, request):
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "ok\n")
    return None


async def main():
    if len(sys.argv) != 3:
        print("usage: proxy_app.py HOST PORT", file=sys.stderr)
        sys.exit(2)
    host, port = sys.argv[1], int(sys.argv[2])
    async with serve(handler, host, port, process_request=health, max_size=2**22):
        print("LISTENING", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
