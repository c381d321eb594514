"""`send_messages` sends what `Celery.send_task` sends (the worker, Flower and the "sent"
event see the same message), only built with less work."""

from __future__ import annotations

import uuid
from typing import Any

from worker.app import create_app
from worker.broker.publish import QUEUE, TASK_NAME, send_messages
from worker.settings import Settings

# Made anew per message: the task id (also root id) and what shows the argument.
PER_MESSAGE = {"id", "root_id", "argsrepr", "correlation_id"}


def _recorded(monkeypatch: Any, app: Any, send: Any) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    def record(producer: Any, name: str, message: Any, **options: Any) -> None:
        calls.append((name, message, options))

    monkeypatch.setattr(app.amqp, "send_task_message", record)
    with app.connection_for_write() as connection:
        producer = app.amqp.Producer(connection, auto_declare=False)
        send(app, producer)
    return calls


def _comparable(call: tuple[Any, ...]) -> Any:
    name, message, options = call
    headers = {k: v for k, v in message.headers.items() if k not in PER_MESSAGE}
    properties = {k: v for k, v in message.properties.items() if k not in PER_MESSAGE}
    event = {
        k: v for k, v in (message.sent_event or {}).items() if k not in {"uuid", "args", "root_id"}
    }
    return name, headers, properties, message.body, event, options


def test_the_same_message_as_send_task(monkeypatch: Any) -> None:
    job_id = uuid.uuid4()
    # In memory: nothing is sent (send_task_message is recorded), no Redis needed.
    app = create_app(Settings.model_construct(broker_url="memory://"))
    try:
        ours = _recorded(
            monkeypatch,
            app,
            lambda app, producer: send_messages(app, producer, TASK_NAME, QUEUE, [job_id]),
        )
        celerys = _recorded(
            monkeypatch,
            app,
            lambda app, producer: app.send_task(
                TASK_NAME, args=[str(job_id)], queue=QUEUE, producer=producer
            ),
        )
    finally:
        app.close()
    assert len(ours) == len(celerys) == 1
    # send_task declares the route's queue before the message (its `declare` left out, the
    # route's queue); ours passes that same queue, bound to the producer's channel already.
    [declared] = ours[0][2].pop("declare")
    assert declared == celerys[0][2]["queue"] and declared.is_bound
    assert "declare" not in celerys[0][2]
    # Likewise the events' dispatcher: Celery's default one, but for its bound exchange
    # (the events it sends: test_the_same_sent_events_as_send_task).
    events = ours[0][2].pop("event_dispatcher")
    assert isinstance(events, type(app.events.Dispatcher(enabled=False)))
    assert events.exchange.is_bound
    assert "event_dispatcher" not in celerys[0][2]
    assert _comparable(ours[0]) == _comparable(celerys[0])
    for field in ("argsrepr", "kwargsrepr"):
        assert ours[0][1].headers[field] == celerys[0][1].headers[field]
    # The job id is the message's argument, the task id a new one each time.
    [(_, message, _)] = ours
    assert message.body[0] == [str(job_id)]
    assert message.sent_event is not None and message.sent_event["args"] == repr([str(job_id)])
    assert message.headers["id"] != celerys[0][1].headers["id"]


def _published(monkeypatch: Any, app: Any, send: Any) -> list[tuple[Any, dict[str, Any]]]:
    """What reaches `Producer.publish` (task messages and their "sent" events)."""
    calls: list[tuple[Any, dict[str, Any]]] = []
    with app.connection_for_write() as connection:
        producer = app.amqp.Producer(connection, auto_declare=False)
        monkeypatch.setattr(
            producer, "publish", lambda body, **kwargs: calls.append((body, kwargs))
        )
        send(app, producer)
    return calls


def _event(body: Any, kwargs: dict[str, Any]) -> Any:
    made_anew = {"uuid", "args", "root_id", "timestamp", "clock", "local_received"}
    fields = {k: v for k, v in body.items() if k not in made_anew}
    options = {k: v for k, v in kwargs.items() if k != "declare"}
    return fields, options, [(type(e), e.name) for e in kwargs["declare"]]


def test_the_same_sent_events_as_send_task(monkeypatch: Any) -> None:
    job_ids = [uuid.uuid4(), uuid.uuid4()]
    app = create_app(Settings.model_construct(broker_url="memory://"))
    app.conf.task_send_sent_event = True
    try:
        ours = _published(
            monkeypatch,
            app,
            lambda app, producer: send_messages(app, producer, TASK_NAME, QUEUE, job_ids),
        )
        celerys = _published(
            monkeypatch,
            app,
            lambda app, producer: [
                app.send_task(TASK_NAME, args=[str(j)], queue=QUEUE, producer=producer)
                for j in job_ids
            ],
        )
    finally:
        app.close()
    # A task message and its event per job, in the same order.
    assert len(ours) == len(celerys) == 4
    for (body, kwargs), (theirs, their_kwargs) in zip(ours[1::2], celerys[1::2], strict=True):
        assert body["type"] == "task-sent"
        assert _event(body, kwargs) == _event(theirs, their_kwargs)
        assert body["args"] == theirs["args"]
        # The same exchange declared, bound to the producer's channel once for both.
    assert ours[1][1]["declare"][0] is ours[3][1]["declare"][0]
    assert ours[1][1]["declare"][0].is_bound
