"""Shards on HTTP(S) servers and S3-compatible object stores, read over the network and never copied to disk.

Two kinds of read. `ShardStream` reads a whole shard once from its start (listing its members): one GET, continued
from the next byte with `Range: bytes=N-` when a connection drops. `read_ranges` reads the bytes of many members at
once (a micro-batch): one Range GET per member, run concurrently on keep-alive connections (FETCH_THREADS per
process). Every request is retried after a dropped connection, a timeout or a 408/429/5xx answer, with jittered
exponential backoff, D2V_REMOTE_RETRIES times (default 5); then it fails with one sentence naming the URL.

s3:// URLs are presigned with botocore (the `s3` extra), which finds credentials, region and endpoint as the AWS
tools do (AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL for MinIO, R2, GCS or another
S3-compatible store; no credentials: unsigned requests, for public buckets); after that both schemes share one path.

A server must honour Range requests: a 200 answer to one is refused rather than read on, since a server that
ignores Range (python -m http.server) would hand back whole files where members were asked for. A member read
checks the shard's total size against the one listed, so a shard replaced on the server is an error, not wrong
bytes.
"""
from __future__ import annotations

import http.client
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from d2v.core.errors import ConfigError, DataError

SCHEMES = ("http://", "https://", "s3://")
RETRIES = 5  # tries after the first (D2V_REMOTE_RETRIES)
TIMEOUT_S = 60.0  # per connect or read (D2V_REMOTE_TIMEOUT)
BACKOFF_S = 0.5  # first wait; doubled per try, at most MAX_BACKOFF_S, times a jitter in [0.5, 1.5)
MAX_BACKOFF_S = 30.0
FETCH_THREADS = 16  # concurrent member reads per process (per DataLoader worker)
PRESIGN_S = 3600  # presigned S3 URLs live this long; reused for half of it
MAX_REDIRECTS = 5

_local = threading.local()  # this thread's keep-alive connections, by (scheme, host:port)
_shared = {"pid": None, "pool": None, "s3": None}  # per process: forked DataLoader workers make their own
_shared_lock = threading.Lock()
_jitter = random.Random()  # its own generator: backoff never touches the random state a run might use


def is_remote(source) -> bool:
    """Whether a data source names shards on a server (http://, https://, s3://)."""
    return str(source).startswith(SCHEMES)


def _env_number(name: str, default: float, kind: type, low: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'} of at least {low}, "
                          f"got {text!r}")
    return value


def retries() -> int:
    return int(_env_number("D2V_REMOTE_RETRIES", RETRIES, int, 0))


def timeout_s() -> float:
    return float(_env_number("D2V_REMOTE_TIMEOUT", TIMEOUT_S, float, 0.1))


def _process_state() -> dict:
    """The per-process part of the module's state (a forked worker must not use its parent's threads or sockets)."""
    if _shared["pid"] != os.getpid():
        with _shared_lock:
            if _shared["pid"] != os.getpid():
                _shared.update(pid=os.getpid(), pool=None, s3=None)
    return _shared


# ---------------------------------------------------------------------------------------------- S3
class _S3Signer:
    """Presigned GET URLs for s3://bucket/key, from botocore's usual credential and endpoint chain."""

    def __init__(self):
        try:
            import botocore.session
            from botocore import UNSIGNED
            from botocore.config import Config
        except ImportError:
            raise ConfigError("s3:// data needs botocore: pip install 'd2v[s3]'") from None
        session = botocore.session.get_session()
        signed = session.get_credentials() is not None
        custom = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        # S3-compatible servers on an IP address or localhost (MinIO, moto) have no per-bucket host names
        config = Config(signature_version="s3v4" if signed else UNSIGNED,
                        s3={"addressing_style": "path" if custom else "auto"})
        self.client = session.create_client("s3", region_name=session.get_config_variable("region") or "us-east-1",
                                            config=config)
        self.cache: dict[str, tuple[str, float]] = {}

    def url(self, s3_url: str) -> str:
        hit = self.cache.get(s3_url)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        bucket, _, key = s3_url[len("s3://"):].partition("/")
        if not bucket or not key:
            raise DataError(f"{s3_url} is not an s3://bucket/key URL")
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                 ExpiresIn=PRESIGN_S)
        self.cache[s3_url] = (url, time.monotonic() + PRESIGN_S / 2)
        return url


def _http_url(url: str) -> str:
    if not url.startswith("s3://"):
        return url
    state = _process_state()
    if state["s3"] is None:
        with _shared_lock:
            if state["s3"] is None:
                state["s3"] = _S3Signer()
    return state["s3"].url(url)


# ---------------------------------------------------------------------------------------------- one request
class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, 408/429/5xx); its text says what happened."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError)):
        return "connection dropped"
    return str(exc).strip() or type(exc).__name__


def _connection(parts: urllib.parse.SplitResult, own: bool):
    """A connection to the URL's server: this thread's keep-alive one, or (own) a new one for a long stream."""
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    if own:
        return cls(parts.netloc, timeout=timeout_s())
    if getattr(_local, "pid", None) != os.getpid():
        _local.pid, _local.conns = os.getpid(), {}  # a forked child shares its parent's sockets: never reuse them
    key = (parts.scheme, parts.netloc)
    if key not in _local.conns:
        _local.conns[key] = cls(parts.netloc, timeout=timeout_s())
    return _local.conns[key]


def _forget(conn) -> None:
    """Close a connection whose state is unknown (error, unread body) so that the next request opens a new one."""
    conn.close()
    for key, c in list(getattr(_local, "conns", {}).items()):
        if c is conn:
            del _local.conns[key]


def _refuse(url: str, status: int, reason: str) -> DataError:
    if status == 200:
        return DataError(f"the server of {url} ignores Range requests (it answered 200 to one); d2v reads shard "
                         f"members by range: serve the shards with one that honours them (nginx, caddy, an object "
                         f"store; python -m http.server does not)")
    if status in (404, 410):
        return DataError(f"{url} does not exist (HTTP {status})")
    if status in (401, 403):
        hint = " (AWS_ACCESS_KEY_ID / AWS_PROFILE)" if url.startswith("s3://") else ""
        return DataError(f"access to {url} was refused (HTTP {status}); check the credentials{hint}")
    if status == 416:
        return DataError(f"{url} is shorter than when it was listed (HTTP 416): the shard changed on the server; "
                         f"start a new run to list it again")
    return DataError(f"{url} answered HTTP {status} {reason}".rstrip())


def _content_range(resp, url: str) -> tuple[int, int | None]:
    """(first byte, total size or None) of a 206 answer's Content-Range: bytes FIRST-LAST/TOTAL."""
    value = resp.getheader("Content-Range", "")
    try:
        unit, _, spec = value.partition(" ")
        span, _, total = spec.partition("/")
        return int(span.split("-")[0]), (None if total.strip() == "*" else int(total))
    except ValueError:
        raise DataError(f"the server of {url} answered a Range request without a valid Content-Range "
                        f"({value!r})") from None


def _get(url: str, first: int, last: int | None, own: bool = False):
    """(connection, response) of GET url for bytes first..last (inclusive; None: to the end), a 206 answer,
    following up to MAX_REDIRECTS redirects (a hub that hands out CDN addresses). Raises _Transient for what a retry
    may cure, DataError for what it cannot."""
    target = _http_url(url)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(target)
        conn = _connection(parts, own)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Range": f"bytes={first}-{'' if last is None else last}", "Accept-Encoding": "identity"}
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            _forget(conn)
            raise _Transient(_why(exc)) from None
        if resp.status == 206:
            if not resp.getheader("Content-Range"):
                _forget(conn)
                raise DataError(f"the server of {url} answered a Range request without a Content-Range")
            return conn, resp
        _finish(conn, resp)
        location = resp.getheader("Location")
        if resp.status not in (301, 302, 303, 307, 308) or not location:
            break
        target = urllib.parse.urljoin(target, location)
    if resp.status in (408, 429) or resp.status >= 500:
        raise _Transient(f"HTTP {resp.status}")
    if resp.status in (301, 302, 303, 307, 308):
        raise DataError(f"{url} redirects more than {MAX_REDIRECTS} times")
    raise _refuse(url, resp.status, resp.reason)


def _finish(conn, resp) -> None:
    """Read a short answer that is not the data (an error page, a redirect), so that the connection stays usable;
    close it when the body is long or unknown."""
    if resp.length is not None and resp.length < 1 << 16:
        try:
            resp.read()
            return
        except (OSError, http.client.HTTPException):
            pass
    _forget(conn)


def _backoff(attempt: int) -> None:
    time.sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2 ** attempt) * _jitter.uniform(0.5, 1.5))


def _attempts(tries: int):
    """The attempts of a read (0 .. tries - 1), with a backoff before each one after the first."""
    for attempt in range(tries):
        if attempt:
            _backoff(attempt - 1)
        yield attempt


def _gave_up(url: str, why: str, tries: int) -> DataError:
    return DataError(f"cannot read {url} ({why}, {tries} tries); check the URL and the network")


# ---------------------------------------------------------------------------------------------- member reads
def read_range(url: str, first: int, size: int, total: int | None = None) -> bytes:
    """`size` bytes of `url` from byte `first`; `total`, when known, is the size the shard was listed with."""
    if size <= 0:
        return b""
    tries, why = retries() + 1, ""
    for _ in _attempts(tries):
        try:
            conn, resp = _get(url, first, first + size - 1)
        except _Transient as exc:
            why = str(exc)
            continue
        start, length = _content_range(resp, url)
        if start != first or (total is not None and length is not None and length != total):
            _forget(conn)
            raise DataError(f"{url} changed on the server since the run listed it (now {length} bytes, listed "
                            f"{total}); start a new run to list it again")
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            _forget(conn)
            why = _why(exc)
            continue
        if len(data) == size:
            return data
        _forget(conn)
        why = "connection dropped"
    raise _gave_up(url, why, tries)


def _fetch_pool() -> ThreadPoolExecutor:
    state = _process_state()
    if state["pool"] is None:
        with _shared_lock:
            if state["pool"] is None:
                state["pool"] = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="d2v-fetch")
    return state["pool"]


def read_ranges(requests: list[tuple[str, int, int, int | None]]) -> list[bytes]:
    """read_range(url, first, size, total) of each request, concurrently, in the order given."""
    if len(requests) <= 1:
        return [read_range(*r) for r in requests]
    return list(_fetch_pool().map(lambda r: read_range(*r), requests))


# ---------------------------------------------------------------------------------------------- whole shards
class ShardStream:
    """A shard read once from its first byte to its last, as a file object with read(). A dropped connection is
    continued from the next byte (`Range: bytes=N-`) after a backoff; `total` is the shard's size, known after
    the first answer."""

    def __init__(self, url: str):
        self.url, self.pos, self.total = url, 0, None
        self._conn = self._resp = None

    def _open(self) -> None:
        conn, resp = _get(self.url, self.pos, None, own=True)
        start, total = _content_range(resp, self.url)
        if start != self.pos or (self.total is not None and total != self.total):
            conn.close()
            raise DataError(f"{self.url} changed on the server while it was read; list it again")
        self._conn, self._resp, self.total = conn, resp, total

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._resp = None

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        if n == 0 or (self.total is not None and self.pos >= self.total):
            return b""
        tries, why = retries() + 1, ""
        for _ in _attempts(tries):
            try:
                if self._resp is None:
                    self._open()
                data = self._resp.read1(n) if hasattr(self._resp, "read1") else self._resp.read(n)
            except _Transient as exc:
                why = str(exc)
                continue
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                why = _why(exc)
                continue
            if data or (self.total is not None and self.pos >= self.total) or self.total is None:
                self.pos += len(data)
                return data
            self._drop()  # an empty read before the end: the server closed the connection
            why = "connection dropped"
        raise _gave_up(self.url, why, tries)

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "ShardStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
