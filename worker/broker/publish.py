"""Handing job ids to the broker. A message carries the job id only; the row holds the rest."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from celery import Celery

from kombu import Queue
from kombu.common import Broadcast
from kombu.exceptions import OperationalError as _BrokerOperationalError

# What a publish raises when the broker cannot be reached (kombu's, behind this door).
BROKER_ERRORS: tuple[type[BaseException], ...] = (_BrokerOperationalError,)

TASK_NAME = "macao_ocr.process_job"
QUEUE = "macao-ocr"
# Webhook deliveries: their own task and queue, consumed by a process of their own, so a slow
# receiver never holds a thread an OCR job could use.
WEBHOOK_TASK_NAME = "macao_ocr.deliver_webhook"
WEBHOOK_QUEUE = "macao-ocr-webhooks"
# Redis commands buffered before a flush (a message is an LPUSH plus its "sent" event).
PIPELINE_COMMANDS = 1_000


class MessageSender:
    """Sends one task message per id (its "sent" event with it) through `producer`, as
    `app.send_task(task, args=[str(id)], queue=queue, producer=producer)` sends it, at a
    third of its CPU: what send_task works out per message from the app's configuration (the
    route, the origin, the sent-event flag) is worked out once, and no result handle is
    made. The same messages and events (tests/unit/test_publish.py compares them). Made once
    per producer (a held one keeps its sender); not thread-safe, as the producer is not."""

    def __init__(self, app: Celery, producer: Any, task: str, queue: str) -> None:
        from celery.utils.saferepr import saferepr

        self.app = app
        self.producer = producer
        self.task = task
        self.options = app.amqp.router.route({"queue": queue}, task, (), None, None)
        self.origin = app.thread_oid
        self.sent_event = app.conf.task_send_sent_event
        # What send_task_message declares before each message (the route's queue) and each
        # event (the events' exchange), bound to the producer's channel once: unbound, kombu
        # copies them to bind them for every message before finding them declared already
        # (a third of a publish's CPU). After a reconnect kombu revives them on the new
        # channel, as it does a declared entity it is handed again.
        route = self.options.get("queue")
        self.sends = dict(self.options)
        if isinstance(route, Queue) and not isinstance(route, Broadcast):
            self.sends["declare"] = [route.bind(producer.channel)]
        if self.sent_event:
            events = app.events.Dispatcher(producer.connection, enabled=False)
            events.exchange = events.exchange.bind(producer.channel)
            self.sends["event_dispatcher"] = events
        # The argument's repr is its saferepr: one short string, under every size limit.
        self.kwargsrepr = saferepr({})

    def send(self, ids: Sequence[uuid.UUID]) -> None:
        amqp, task, producer, origin = self.app.amqp, self.task, self.producer, self.origin
        with producer.connection._reraise_as_library_errors():
            for one in ids:
                args = [str(one)]
                message = amqp.create_task_message(
                    str(uuid.uuid4()), task, args, {}, None, None, None, None, None, 0, None,
                    None, None, origin, None, None, self.sent_event, None, None, None, None,
                    ignore_result=None, replaced_task_nesting=0, argsrepr=repr(args),
                    kwargsrepr=self.kwargsrepr, **self.options,
                )  # fmt: skip
                amqp.send_task_message(producer, task, message, **self.sends)


def send_messages(
    app: Celery, producer: Any, task: str, queue: str, ids: Sequence[uuid.UUID]
) -> None:
    """`MessageSender(app, producer, task, queue).send(ids)`."""
    MessageSender(app, producer, task, queue).send(ids)


class Publisher(Protocol):
    """Sends one task message per job id. Raises if the broker cannot take them."""

    def publish(self, job_ids: Sequence[uuid.UUID]) -> None: ...


class CeleryPublisher:
    """Publishes through a Celery app, by task name (the producer never imports the task).
    `task`/`queue`: the OCR job's by default; the webhook delivery's for webhooks."""

    def __init__(self, app: Celery, *, task: str = TASK_NAME, queue: str = QUEUE) -> None:
        self.app = app
        self.task = task
        self.queue = queue

    def publish(self, ids: Sequence[uuid.UUID]) -> None:
        """Send every id over one connection of our own, pipelined: kombu's publish batch
        buffers each message's Redis commands (and its "sent" event's) and writes them in
        one round trip per PIPELINE_COMMANDS, instead of two round trips per message. A
        failure raises: the caller records nothing as published, and the sweeper publishes
        again what is missing (a duplicate message is harmless: jobs are claimed in SQL).

        Not kombu's producer pool: that pool is global per broker URL, so closing any app
        of the process (a CLI command, a test) would close it under every other app."""
        if not ids:
            return
        with self.app.connection_for_write() as connection:
            producer: Any = self.app.amqp.Producer(connection, auto_declare=False)
            # kombu < 5.7 has no publish batch: one round trip per message, as before.
            batch = getattr(producer, "batch", None)
            with batch(max_size=PIPELINE_COMMANDS) if batch else contextlib.nullcontext():
                send_messages(self.app, producer, self.task, self.queue, ids)


class BrokerUnavailable(ConnectionError):
    """Raised by RecordingPublisher when told to behave like a broker that is down."""


@dataclass
class RecordingPublisher:
    """For tests: remembers what was published; `fail=True` plays a broker that is down;
    `on_publish` sees each batch before it is recorded (to check what is committed by then)."""

    published: list[uuid.UUID] = field(default_factory=list)
    batches: list[list[uuid.UUID]] = field(default_factory=list)
    fail: bool = False
    on_publish: Callable[[Sequence[uuid.UUID]], None] | None = None

    def publish(self, job_ids: Sequence[uuid.UUID]) -> None:
        if self.fail:
            raise BrokerUnavailable("broker unavailable (simulated)")
        if self.on_publish is not None:
            self.on_publish(job_ids)
        self.batches.append(list(job_ids))
        self.published.extend(job_ids)
