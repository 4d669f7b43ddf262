"""Load client for `wsdrain lab --client python`, built on the `websockets` library.

Runs N clients against URL. Each sends "<id>:<seq>" every interval and checks the echo,
reconnects after a close (following {"reconnect_after_ms": N} in the close reason plus
its own jitter) and records one JSON object per connection, printed on stdout after
stdin closes (the lab's stop signal). Prints "ready" once all clients are connected.
Field names match the Rust client's ConnRecord; accounting is the same (docs/lab.md).
"""

import argparse
import asyncio
import json
import random
import sys
import threading
import time

import websockets
from websockets.exceptions import ConnectionClosed

POD_HEADER = "x-lab-pod"


def parse_hint(reason):
    try:
        v = json.loads(reason)
        n = v.get("reconnect_after_ms") if isinstance(v, dict) else None
        return n if isinstance(n, int) and n >= 0 else None
    except ValueError:
        return None


class Client:
    def __init__(self, cid, args, t0, stop, connected):
        self.cid, self.args, self.t0, self.stop = cid, args, t0, stop
        self.connected = connected
        self.records, self.seq, self.resend = [], 0, []

    def ms(self):
        return int((time.monotonic() - self.t0) * 1000) + self.args.epoch_ms

    def record(self, ws, down_since):
        """The record of a connection just opened (the lab's ConnRecord)."""
        return {
            "client": self.cid,
            "pod": ws.response.headers.get(POD_HEADER),
            "opened_ms": self.ms(),
            "reconnect_ms": None if down_since is None else int((time.monotonic() - down_since) * 1000),
            "code": None, "reason": "", "hint_ms": None, "by_client": False,
            "sent": 0, "echoed": 0, "lost": 0, "resent": 0, "ignores_close": False,
        }

    async def run(self):
        down_since, attempt = None, 0
        while not self.stop.is_set():
            try:
                ws = await asyncio.wait_for(websockets.connect(self.args.url, open_timeout=2), 3)
            except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException):
                attempt += 1
                await self.pause(min(100 * 2 ** min(attempt, 4), 1600) + random.randint(0, 100))
                continue
            attempt = 0
            rec = self.record(ws, down_since)
            self.connected[0] += 1
            end = await self.session(ws, rec)
            self.connected[0] -= 1
            rec["ended_ms"] = self.ms()
            self.records.append(rec)
            down_since = time.monotonic()
            if end == "stopped":
                break
            if end == "clean" and rec["hint_ms"] is not None:
                delay = rec["hint_ms"] + random.randint(0, 100)
            elif end == "clean":
                delay = random.randint(0, 1000)
            else:
                delay = 100 + random.randint(0, 100)
            await self.pause(delay)
        # A client between connections still owes what a clean close left unanswered.
        if self.resend:
            await self.deliver_resends(down_since)
        # What could not be delivered even then was never answered.
        if self.records:
            self.records[-1]["lost"] += len(self.resend)

    async def deliver_resends(self, down_since):
        """The run ended while this client waited to reconnect after a clean close: it
        connects once more to deliver what that close left unanswered."""
        try:
            ws = await asyncio.wait_for(websockets.connect(self.args.url, open_timeout=2), 3)
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException):
            return
        rec = self.record(ws, down_since)
        await self.wind_up(ws, rec, set())
        rec["ended_ms"] = self.ms()
        self.records.append(rec)

    async def wind_up(self, ws, rec, outstanding):
        """The end of the run on an open connection: send what waits for a resend, collect
        the last echoes (bounded), close with 1000. Only what is never answered is lost."""
        try:
            while self.resend:
                s = self.resend.pop()
                outstanding.add(s)
                await ws.send(f"{self.cid}:{s}")
                rec["sent"] += 1
        except ConnectionClosed:
            pass
        deadline = time.monotonic() + 2
        try:
            while outstanding and time.monotonic() < deadline:
                msg = await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
                s = int(str(msg).rsplit(":", 1)[1])
                if s in outstanding:
                    outstanding.discard(s)
                    rec["echoed"] += 1
        except (ConnectionClosed, asyncio.TimeoutError):
            pass
        try:
            await asyncio.wait_for(ws.close(1000), 1)
        except asyncio.TimeoutError:
            pass
        rec["by_client"] = True
        rec["lost"] = len(outstanding)

    async def pause(self, ms):
        try:
            await asyncio.wait_for(self.stop.wait(), ms / 1000)
        except asyncio.TimeoutError:
            pass

    async def session(self, ws, rec):
        outstanding = set()

        async def sender():
            await asyncio.sleep(random.random() * self.args.interval_ms / 1000)
            while True:
                if self.resend:
                    s = self.resend.pop()
                else:
                    self.seq += 1
                    s = self.seq
                outstanding.add(s)
                await ws.send(f"{self.cid}:{s}")
                rec["sent"] += 1
                await asyncio.sleep(self.args.interval_ms / 1000)

        async def receiver():
            async for msg in ws:
                s = int(str(msg).rsplit(":", 1)[1])
                if s in outstanding:
                    outstanding.discard(s)
                    rec["echoed"] += 1

        tasks = [asyncio.ensure_future(sender()), asyncio.ensure_future(receiver())]
        for t in tasks:
            # A reset ends them with an exception; the close state below says what happened.
            t.add_done_callback(lambda t: t.cancelled() or t.exception())
        stop_task = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait(tasks + [stop_task], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks + [stop_task]:
            if t not in done:
                t.cancel()
        if stop_task in done:
            await self.wind_up(ws, rec, outstanding)
            return "stopped"
        await ws.wait_closed()
        # websockets keeps the peer's close frame in protocol.close_rcvd; None means no close frame (1006).
        rcvd = ws.protocol.close_rcvd
        if rcvd is not None:
            rec["code"] = rcvd.code
            rec["reason"] = rcvd.reason
            rec["hint_ms"] = parse_hint(rcvd.reason)
            rec["resent"] = len(outstanding)
            self.resend.extend(sorted(outstanding, reverse=True))
            return "clean"
        rec["lost"] = len(outstanding)
        return "abnormal"


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--first-id", type=int, default=0)
    p.add_argument("--interval-ms", type=int, default=250)
    p.add_argument("--epoch-ms", type=int, default=0)
    args = p.parse_args()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Stdin closing is the stop signal (also when the lab dies).
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    t0 = time.monotonic()
    connected = [0]
    clients = [Client(args.first_id + i, args, t0, stop, connected) for i in range(args.clients)]
    tasks = [asyncio.ensure_future(c.run()) for c in clients]
    for _ in range(1500):
        if connected[0] >= args.clients or stop.is_set():
            break
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await stop.wait()
    await asyncio.wait(tasks, timeout=5)
    for c in clients:
        for r in c.records:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
