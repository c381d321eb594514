"""What kombu's Redis transport keeps in Redis, read from outside: the sweeper's and the
metrics' one view of the broker (waiting lists, the `unacked` hash, message bodies).

kombu does not offer this as API: the layout below is `kombu.transport.redis` (its
PRIORITY_STEPS, Channel.sep, unacked_key, unacked_index_key) and Celery's message protocol 2
(`[args, kwargs, embed]` as the JSON body). tests/integration/test_broker_layout.py checks
both against a real kombu queue on a real Redis, so an upgrade that changes them fails there.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable
from typing import Any

import redis

from worker.broker.publish import QUEUE

# Priority sub-queues are `<queue>\x06\x16<pri>`; step 0 is the bare queue name. Delivered
# but unacknowledged messages live in the `unacked` hash (scored by delivery time in
# `unacked_index`) until acked or restored.
KOMBU_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_UNACKED_KEY = "unacked"
KOMBU_UNACKED_INDEX_KEY = "unacked_index"


def queue_keys(queue: str = QUEUE) -> list[str]:
    """The Redis list keys kombu uses for a queue (one per priority step)."""
    return [queue if pri == 0 else f"{queue}{KOMBU_SEP}{pri}" for pri in KOMBU_PRIORITY_STEPS]


def broker_message_count(client: redis.Redis, queue: str = QUEUE) -> int:
    """Messages waiting in the queue plus messages delivered but not yet acknowledged."""
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(queue):
        pipe.llen(key)
    pipe.hlen(KOMBU_UNACKED_KEY)
    return sum(int(n) for n in pipe.execute())


def job_id_of_message(raw: bytes | str) -> uuid.UUID | None:
    """The job id a kombu/Celery (protocol 2) message carries, or None if it is not ours."""
    try:
        payload = json.loads(raw)
        if isinstance(payload, list):  # an `unacked` entry: [message, exchange, routing_key]
            payload = payload[0]
        body: Any = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return uuid.UUID(str(args[0]))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def broker_job_ids(
    client: redis.Redis,
    queue: str = QUEUE,
    *,
    held_within_s: float | None = None,
    chunk: int = 1_000,
) -> set[uuid.UUID]:
    """Every job id with a message in the broker (waiting, or delivered and unacked).

    With `held_within_s`, an unacked message delivered longer ago than that does not count:
    its consumer may have been SIGKILLed, and kombu restores it only after the visibility
    timeout (an hour). Republishing it is a harmless duplicate if its consumer is alive.
    """
    found: set[uuid.UUID] = set()

    def add(items: Iterable[Any]) -> None:
        for raw in items:
            job_id = job_id_of_message(raw)
            if job_id is not None:
                found.add(job_id)

    for key in queue_keys(queue):
        start = 0
        while True:
            items = client.lrange(key, start, start + chunk - 1)
            add(items)
            if len(items) < chunk:
                break
            start += chunk
    fresh: set[bytes] | None = None
    if held_within_s is not None:
        # kombu scores each delivery with its consumer's time(); Redis's clock is close enough
        # for a window of a minute.
        seconds, micros = client.time()
        since = seconds + micros / 1e6 - held_within_s
        fresh = {_tag(t) for t in client.zrangebyscore(KOMBU_UNACKED_INDEX_KEY, since, "+inf")}
    for tag, raw in client.hscan_iter(KOMBU_UNACKED_KEY, count=chunk):
        if fresh is None or _tag(tag) in fresh:
            add([raw])
    return found


def _tag(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def stale_deliveries(client: redis.Redis, held_for_s: float) -> int:
    """How many unacked messages were delivered more than `held_for_s` ago."""
    seconds, micros = client.time()
    return int(client.zcount(KOMBU_UNACKED_INDEX_KEY, "-inf", seconds + micros / 1e6 - held_for_s))


def queue_depth(client: redis.Redis, queue: str = QUEUE) -> int:
    """Messages waiting in the queue (every priority list), unacked ones not counted."""
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(queue):
        pipe.llen(key)
    return sum(int(n) for n in pipe.execute())
