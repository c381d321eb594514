"""Celery's consumer, publishing buffered task events in batches rather than at every turn.

Celery buffers a worker's task events (received, started, succeeded) and flushes them at the
next turn of the consumer's event loop: in a busy threads-pool worker that is about one Redis
PUBLISH per event, all on the consumer thread, 8% of a one-process worker's samples holding
the GIL at 200 jobs/s. Here the first buffered event arms one flush EVENT_FLUSH_S later, and
that publish carries every event of the spell; Flower and `celery events` see each one at
most that much later. The dispatcher still flushes by itself whenever a buffer reaches its
limit (24 events), and the consumer flushes what is left when it shuts down.

Selected by `worker_consumer` (`worker.app`).
"""

from __future__ import annotations

from typing import Any

from celery.worker import consumer as celery_consumer

EVENT_FLUSH_S = 0.05

# Celery ships no types for its consumer.
_BaseConsumer: Any = celery_consumer.Consumer


class Consumer(_BaseConsumer):  # type: ignore[misc]
    """Celery's consumer with task events flushed at most every EVENT_FLUSH_S."""

    _event_flush_armed = False

    def on_send_event_buffered(self) -> None:
        # Called from the task threads too. The flag spares the loop a wake-up per event;
        # two threads racing past it only arm two flushes, which is harmless.
        if self.hub and not self._event_flush_armed:
            self._event_flush_armed = True
            self.hub.call_soon(self._arm_event_flush)

    def _arm_event_flush(self) -> None:
        # On the loop's thread: its timer is not for other threads.
        self.hub.call_later(EVENT_FLUSH_S, self._flush_armed_events)

    def _flush_armed_events(self) -> None:
        # Disarm first: an event buffered during the flush arms the next one (and one
        # buffered before it is in this one, as the dispatcher appends before it calls us).
        self._event_flush_armed = False
        self._flush_events()

    def shutdown(self) -> None:
        """Publish the events still buffered, then shut down as Celery does."""
        self._flush_events()
        super().shutdown()
