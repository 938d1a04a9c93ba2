"""A static file server that honours Range requests, for measuring and testing remote shards on 127.0.0.1.

`python -m http.server` answers every Range request with the whole file, which d2v refuses; this one answers
`Range: bytes=A-B` / `bytes=A-` with 206 and a Content-Range, keeps connections alive (HTTP/1.1), serves each
connection on its own thread, and can misbehave on purpose: cut a response after some bytes (`cut_after`, for the
first `cut_count` responses that get that far), count the requests it answered per path and log the byte
ranges it sent. /moved/NAME answers with a redirect to /NAME.

    python -m d2v.bench.shardserver SHARD_DIR --port 8765
    d2v bench data --data 'http://127.0.0.1:8765/shard-{000..003}.tar'
"""
from __future__ import annotations

import argparse
import os
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, 40 ms per request
    server: "ShardServer"

    def log_message(self, *args) -> None:  # quiet: a benchmark prints its own table
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def _range(self, size: int) -> tuple[int, int] | None:
        spec = self.headers.get("Range", "")
        if not spec.startswith("bytes=") or "," in spec:
            return None
        first, _, last = spec[len("bytes="):].partition("-")
        try:
            lo = int(first)
            hi = int(last) if last.strip() else size - 1
        except ValueError:
            return None
        return lo, min(hi, size - 1)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/moved/"):  # as a hub sends readers on to its storage
            self.send_response(302)
            self.send_header("Location", self.path[len("/moved"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = (self.server.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        if self.server.root not in path.parents or not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        span = self._range(size)
        with self.server.lock:
            self.server.requests[path.name] += 1
        if span is not None and span[0] >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        lo, hi = span if span is not None else (0, size - 1)
        with self.server.lock:
            self.server.log.append((path.name, lo, hi, size))
        self.send_response(206 if span is not None else 200)
        if span is not None:
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{size}")
        self.send_header("Content-Length", str(hi - lo + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._send(path, lo, hi - lo + 1)

    def _send(self, path: Path, lo: int, count: int) -> None:
        cut = None
        with self.server.lock:
            if self.server.cut_after is not None and self.server.cut_count > 0 and count > self.server.cut_after:
                self.server.cut_count -= 1
                self.server.cuts += 1
                cut = self.server.cut_after
        with open(path, "rb") as f:
            f.seek(lo)
            left = count if cut is None else cut
            while left > 0:
                chunk = f.read(min(left, 1 << 16))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
        if cut is not None:  # drop the connection mid-body, as a failing network would
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


class ShardServer(ThreadingHTTPServer):
    """Serves the files under `root` on 127.0.0.1:`port` (0: a free port; see .url) from a background thread."""

    daemon_threads = True

    def __init__(self, root, port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.root = Path(root).resolve()
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # answered GETs per file name
        self.log: list[tuple[str, int, int, int]] = []  # (file name, first byte, last byte, file size) per answer
        self.cut_after: int | None = None  # with cut_count > 0: responses longer than this are cut after it
        self.cut_count = 0
        self.cuts = 0
        self.connections: set = set()  # open keep-alive connections: stop() closes them too
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "ShardServer":
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection, as a server that went away would."""
        self.shutdown()
        self.server_close()
        with self.lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> "ShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a folder of shards over HTTP with Range support.")
    parser.add_argument("root", help="the folder to serve")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    if not os.path.isdir(args.root):
        parser.error(f"{args.root} is not a folder")
    server = ShardServer(args.root, args.port)
    print(f"serving {server.root} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
