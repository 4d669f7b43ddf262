"""A minimal WebSocket echo app with admin API v1, written with Python `websockets`,
standing in for "your own app" in `wsdrain lab --app` tests and docs.

    python lab_app.py IP PORT ADMIN_PORT

Like most apps it dies at once on SIGTERM (Python's default), dropping its sockets.
"""

import asyncio
import json
import sys

import websockets

sessions = set()


async def echo(ws):
    sessions.add(ws)
    try:
        async for msg in ws:
            await ws.send(msg)
    except websockets.exceptions.ConnectionClosed:
        pass
    finally:
        sessions.discard(ws)


async def admin(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        body = json.loads(await reader.readexactly(length) or b"{}") if length else {}
        if method == "POST" and path == "/drain":
            n = int(body.get("max", 0))
            chosen = list(sessions)[:n]
            for ws in chosen:
                sessions.discard(ws)
                asyncio.ensure_future(ws.close(int(body.get("code", 1012)), str(body.get("reason", ""))))
            out, status = {"closed": len(chosen), "remaining": len(sessions)}, "200 OK"
        elif method == "GET" and path == "/connections":
            out, status = {"open": len(sessions)}, "200 OK"
        else:
            out, status = {"error": "not found"}, "404 Not Found"
        data = json.dumps(out).encode()
        writer.write(b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\n"
                     + b"Content-Length: " + str(len(data)).encode() + b"\r\nConnection: close\r\n\r\n" + data)
        await writer.drain()
    except (ValueError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    ip, port, admin_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    await asyncio.start_server(admin, ip, admin_port)
    async with websockets.serve(echo, ip, port):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
