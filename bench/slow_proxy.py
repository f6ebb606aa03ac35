"""A TCP proxy that delays every reply: a store made slower than recomputing (issue 31).

Put in front of a real redis-server, it makes the remote tier as far away as a store
across a slow network: every chunk the server sends back reaches the client
``delay_ms`` after it left the server (chunks keep their order; throughput is not
capped, as on a long fat link).  Requests go through undelayed, so a command's
round trip gains ``delay_ms`` once.

In a bench (`bench/multi_turn.py`'s ``slow_remote`` case), in a process of its own
(`SlowProxyProcess`): a store across a network costs this machine no CPU, and a proxy
thread in the measuring process would hold its GIL while it forwards KV, which made
that case's TTFT look slower than the plugin is::

    proxy = SlowProxyProcess(("127.0.0.1", redis_port), delay_ms=40).start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    ...
    proxy.stop()  # then proxy.connections, proxy.replies_delayed

`SlowProxy` is the same proxy on a thread (the tests use it; they measure no time).

By hand, in front of a redis-server on port 6379 (Ctrl-C stops it)::

    python bench/slow_proxy.py --upstream 127.0.0.1:6379 --delay-ms 40 --port 6380
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time


class SlowProxy:
    """The proxy on its own event loop in a daemon thread; `port` is where it listens."""

    def __init__(self, upstream: tuple[str, int], delay_ms: float, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.upstream, self.delay_s = upstream, delay_ms / 1000.0
        self.host, self.port = host, port
        self.connections = 0
        self.replies_delayed = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="slow-proxy")

    def start(self) -> "SlowProxy":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = fut.result(10)
        return self

    def stop(self) -> None:
        async def close():
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):  # its pipes then read EOF and end
                w.close()
            await asyncio.sleep(0.05)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        return self._server.sockets[0].getsockname()[1]

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, up_w}
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pipe(client_r, up_w)),
                 asyncio.create_task(self._read_replies(up_r, queue)),
                 asyncio.create_task(self._send_replies(queue, client_w))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for w in (client_w, up_w):
                w.close()
                self._writers.discard(w)

    @staticmethod
    async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass

    async def _read_replies(self, r: asyncio.StreamReader, queue: asyncio.Queue) -> None:
        try:
            while data := await r.read(1 << 16):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((0.0, b""))

    async def _send_replies(self, queue: asyncio.Queue, w: asyncio.StreamWriter) -> None:
        while True:
            due, data = await queue.get()
            if not data:
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.replies_delayed += 1
            try:
                w.write(data)
                await w.drain()
            except (ConnectionError, OSError):
                return


class SlowProxyProcess:
    """`SlowProxy` in a child process; `port` is where it listens.  Its counters are
    read when it stops."""

    def __init__(self, upstream: tuple[str, int], delay_ms: float) -> None:
        self.upstream, self.delay_ms = upstream, delay_ms
        self.port = 0
        self.connections = self.replies_delayed = 0
        self._proc: subprocess.Popen | None = None
        fd, self._stats_path = tempfile.mkstemp(prefix="slow-proxy-", suffix=".json")
        os.close(fd)

    def start(self) -> "SlowProxyProcess":
        host, port = self.upstream
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--upstream", f"{host}:{port}",
             "--delay-ms", str(self.delay_ms), "--stats-file", self._stats_path],
            stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline()  # "listening on 127.0.0.1:PORT, ..."
        if not line.startswith("listening on "):
            self._proc.kill()
            raise RuntimeError(f"the slow proxy did not start: {line!r}")
        self.port = int(line.split()[2].rstrip(",").rpartition(":")[2])
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            with open(self._stats_path) as f:
                stats = json.load(f)
            self.connections, self.replies_delayed = stats["connections"], stats["replies_delayed"]
        except (OSError, ValueError, KeyError):
            pass
        finally:
            os.unlink(self._stats_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", default="127.0.0.1:6379", help="HOST:PORT of the store")
    ap.add_argument("--delay-ms", type=float, default=40.0)
    ap.add_argument("--port", type=int, default=0, help="where to listen (0: a free port)")
    ap.add_argument("--stats-file", help="on exit, write its counters here (JSON)")
    args = ap.parse_args()
    host, _, port = args.upstream.rpartition(":")
    proxy = SlowProxy((host or "127.0.0.1", int(port)), args.delay_ms, args.port).start()
    print(f"listening on 127.0.0.1:{proxy.port}, replies from {args.upstream} delayed "
          f"{args.delay_ms:g} ms", flush=True)
    # SIGTERM (SlowProxyProcess.stop) or Ctrl-C ends it; set by hand, since a child
    # may inherit SIGINT ignored from the process that started it.
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.2):
        pass
    proxy.stop()
    if args.stats_file:
        with open(args.stats_file, "w") as f:
            json.dump({"connections": proxy.connections,
                       "replies_delayed": proxy.replies_delayed}, f)


if __name__ == "__main__":
    main()
