"""A publisher for a long-running server process (the HTTP API): one held broker connection,
and the ids of concurrent callers sent together.

`CeleryPublisher` opens a connection per call, which a CLI run or a batch amortises over
thousands of messages; a server publishing one job per request would pay it (TCP connect,
client handshake, queue declaration) on every request. This one keeps the connection for the
process's life, and while one caller's publish is on the wire, the ids other request threads
hand in wait and then go out together in the next pipelined write: a busy server makes a
round trip per group of requests, not per request.

Each `publish` still returns only once its own ids are written (or raises if the broker could
not take them), so the producer's enqueue-after-commit and its `enqueued_at` bookkeeping
stay as they are. A failed write drops the connection; the next one opens a new one.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from worker.broker.publish import PIPELINE_COMMANDS, QUEUE, TASK_NAME, MessageSender

if TYPE_CHECKING:
    from celery import Celery

# Outcomes kept for callers still to read theirs; older ones are dropped.
KEEP_OUTCOMES = 1024
T = TypeVar("T")
R = TypeVar("R")


class Combiner(Generic[T, R]):
    """Runs `flush(items)` one call at a time over the items concurrent threads hand in:
    while a flush runs, new items gather, and the first of their threads to find no flush
    running flushes them all. Each `submit` returns the outcome (result, or the exception
    raised) of the flush that carried its items. No thread of its own: callers take turns."""

    def __init__(self, flush: Callable[[list[T]], R]) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._pending: list[T] = []
        self._open = 0  # the group the pending items belong to
        self._flushing = False
        self._outcomes: dict[int, tuple[R | None, BaseException | None]] = {}

    def submit(self, items: Sequence[T]) -> R:
        """Flush `items` (with whatever others hand in meanwhile); the flush's outcome."""
        with self._cond:
            self._pending.extend(items)
            group = self._open
            while group not in self._outcomes:
                if self._flushing:
                    self._cond.wait()
                    continue
                # No flush running: this thread flushes the open group (its own items in it).
                self._flushing = True
                batch, self._pending = self._pending, []
                flushing, self._open = self._open, self._open + 1
                self._cond.release()
                outcome: tuple[R | None, BaseException | None]
                try:
                    outcome = (self._flush(batch), None)
                except BaseException as exc:
                    outcome = (None, exc)
                finally:
                    self._cond.acquire()
                self._outcomes[flushing] = outcome
                self._outcomes.pop(flushing - KEEP_OUTCOMES, None)
                self._flushing = False
                self._cond.notify_all()
            result, error = self._outcomes[group]
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def idle(self) -> None:
        """Wait until no flush runs (for a clean close)."""
        with self._cond:
            while self._flushing:
                self._cond.wait()


class SharedConnectionPublisher:
    """Thread-safe; close() when the process stops."""

    def __init__(self, app: Celery, *, task: str = TASK_NAME, queue: str = QUEUE) -> None:
        self.app = app
        self.task = task
        self.queue = queue
        self._combiner: Combiner[uuid.UUID, None] = Combiner(self._send)
        self._connection: Any = None
        self._producer: Any = None
        self._sender: MessageSender | None = None

    def publish(self, ids: Sequence[uuid.UUID]) -> None:
        """Send one message per id, with whatever other threads are sending meanwhile."""
        if ids:
            self._combiner.submit(ids)

    def _send(self, ids: Sequence[uuid.UUID]) -> None:
        try:
            if self._producer is None or self._sender is None:
                self._connection = self.app.connection_for_write()
                self._producer = self.app.amqp.Producer(self._connection, auto_declare=False)
                self._sender = MessageSender(self.app, self._producer, self.task, self.queue)
            batch = getattr(self._producer, "batch", None)
            with batch(max_size=PIPELINE_COMMANDS) if batch else contextlib.nullcontext():
                self._sender.send(ids)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        self._sender = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        """Close the held connection (a later publish opens a new one)."""
        self._combiner.idle()
        self._drop()
