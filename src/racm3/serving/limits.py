"""The server's limits: request size, image pixels, bounded worker pools with a queue, request timeouts."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from starlette.exceptions import HTTPException

MAX_SAMPLES = 16  # per request: every sample is a full decode, and one request must not hold the server for long
MAX_DEMOS = 8  # in-context demonstrations per request (the generator's context holds few anyway)
MAX_ADD = 64  # documents per POST /v1/memory/documents
MAX_CAPTION_CHARS = 1000
MAX_ID_CHARS = 200


@dataclass(frozen=True)
class Limits:
    """What one server accepts. Defaults suit a laptop CPU; `racm3 serve` exposes each as an option."""

    max_upload_bytes: int = 8 * 1024 * 1024  # a request body above this is refused with 413, before it is read
    generation_workers: int = 1  # generations run at once (each uses every core through torch)
    generation_queue: int = 4  # generations waiting beyond those; more -> 503 with Retry-After
    read_workers: int = 2  # searches, document reads and memory writes run at once
    read_queue: int = 64  # reads waiting beyond those; more -> 503
    timeout_s: float = 120.0  # a request still unanswered after this -> 504 (a queued job is cancelled)
    write_wait_s: float = 30.0  # a memory write waits this long for another process writing the memory

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "generation_workers", "read_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("generation_queue", "read_queue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.timeout_s > 0 or not self.write_wait_s >= 0:
            raise ValueError(f"timeout_s must be above 0 and write_wait_s 0 or more, got {self.timeout_s}, "
                             f"{self.write_wait_s}")


class QueueFull(Exception):
    """A bounded pool has as many jobs running and waiting as it takes; retry_after is a guess in seconds."""

    def __init__(self, what: str, retry_after: int):
        super().__init__(f"the {what} queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class BoundedPool:
    """A thread pool that refuses work beyond `workers` running + `queue` waiting jobs (QueueFull), at once.

    It keeps a running mean of job seconds to suggest a Retry-After.
    """

    def __init__(self, what: str, workers: int, queue: int):
        self.what = what
        self.workers = workers
        self.capacity = workers + queue
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"racm3-{what}")
        self._lock = threading.Lock()
        self._pending = 0
        self._mean_s = 1.0
        self._done_jobs = 0

    def submit(self, fn, *args) -> Future:
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(self.what, self.retry_after())
            self._pending += 1
        t0 = time.perf_counter()
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._finish(t0, None)
            raise
        fut.add_done_callback(lambda f: self._finish(t0, f))
        return fut

    def _finish(self, t0: float, fut: Future | None) -> None:
        with self._lock:
            self._pending -= 1
            if fut is not None and not fut.cancelled():
                self._done_jobs += 1
                self._mean_s += (time.perf_counter() - t0 - self._mean_s) / min(self._done_jobs, 20)

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_s * max(self._pending, 1) / self.workers))

    def state(self) -> dict:
        with self._lock:
            return {"pending": self._pending, "workers": self.workers, "capacity": self.capacity}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PayloadTooLarge(HTTPException):
    """Raised while a body is read past the limit (an HTTPException, so FastAPI's body parsing passes it on)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the server's limit of {limit:,} bytes; send a smaller "
                              f"image or fewer documents (racm3 serve --max-upload-mb raises the limit)")


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit (nothing read), or once the bytes received
    pass it (chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_413(send, PayloadTooLarge(self.max_bytes).detail)
        received = 0
        started = False

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        async def tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except PayloadTooLarge as exc:
            if not started:
                await _send_413(send, exc.detail)


async def _send_413(send, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
