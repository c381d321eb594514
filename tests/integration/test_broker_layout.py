"""worker.broker.queue reads kombu's Redis layout from outside: checked here against a real
kombu queue on a real Redis, so an upgrade that moves messages elsewhere fails."""

from __future__ import annotations

import uuid
from typing import Any

import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from worker.app import create_app
from worker.broker import queue as layout
from worker.broker.publish import QUEUE, CeleryPublisher
from worker.settings import Settings


def test_constants_are_kombus() -> None:
    assert tuple(kombu_redis.PRIORITY_STEPS) == layout.KOMBU_PRIORITY_STEPS
    assert kombu_redis.Channel.sep == layout.KOMBU_SEP
    assert kombu_redis.Channel.unacked_key == layout.KOMBU_UNACKED_KEY
    assert kombu_redis.Channel.unacked_index_key == layout.KOMBU_UNACKED_INDEX_KEY


def test_every_priority_lands_in_a_list_we_read(clean_redis: str) -> None:
    client = redis.Redis.from_url(clean_redis)
    queue = Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE, max_priority=9)
    with Connection(clean_redis) as conn:
        producer = conn.Producer()
        for priority in range(10):
            producer.publish(
                {"n": priority},
                exchange=queue.exchange,
                routing_key=QUEUE,
                declare=[queue],
                priority=priority,
            )
    keys: list[Any] = client.keys("*")
    lists = {key.decode() for key in keys if client.type(key) == b"list"}
    assert lists <= set(layout.queue_keys()), lists - set(layout.queue_keys())
    assert layout.queue_depth(client) == 10
    assert layout.broker_message_count(client) == 10
    client.close()


def test_a_celery_message_is_found_waiting_and_delivered(clean_redis: str) -> None:
    app = create_app(Settings(broker_url=clean_redis))
    client = redis.Redis.from_url(clean_redis)
    job_id = uuid.uuid4()
    CeleryPublisher(app).publish([job_id])
    assert layout.broker_job_ids(client) == {job_id}
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        assert channel.basic_get(QUEUE, no_ack=False) is not None
        # Delivered, not acknowledged: in the unacked hash, still counted and decoded.
        assert layout.queue_depth(client) == 0
        assert client.hlen(layout.KOMBU_UNACKED_KEY) == 1
        assert layout.broker_message_count(client) == 1
        assert layout.broker_job_ids(client) == {job_id}
        assert layout.broker_job_ids(client, held_within_s=60) == {job_id}
        assert layout.stale_deliveries(client, held_for_s=60) == 0
    client.close()
    app.close()
