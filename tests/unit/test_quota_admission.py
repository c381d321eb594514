"""A process admits to the quota wait only what its share of the quota serves soon; the rest
waits before its claim, in arrival order."""

from __future__ import annotations

import threading
import time

import pytest

from worker.quota.admission import RATE_WINDOW_S, Admission


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _enter_in_thread(admission: Admission, order: list[int], n: int) -> threading.Thread:
    def run() -> None:
        admission.enter()
        order.append(n)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_without_grants_the_room_is_the_floor_and_grants_widen_it_to_the_window() -> None:
    clock = Clock()
    admission = Admission(qps=10, window_s=5, floor_s=1, clock=clock)
    assert admission.capacity() == 10  # the floor: one second of the quota
    clock.now += 2
    for _ in range(8):  # 4 grants/s over this process's 2-s life
        admission.granted()
    assert admission.capacity() == 20  # 4/s x 5 s
    for _ in range(200):
        admission.granted()
    assert admission.capacity() == 50  # never more than the whole quota's window
    clock.now += RATE_WINDOW_S + 1  # grants age out: back to the floor
    assert admission.capacity() == 10


def test_a_job_beyond_the_room_waits_for_one_to_leave_in_arrival_order() -> None:
    admission = Admission(qps=2, window_s=1, floor_s=1)
    admission.enter()
    admission.enter()
    assert admission.inside == 2
    order: list[int] = []
    first = _enter_in_thread(admission, order, 1)
    _wait_for(lambda: admission.waiting == 1)
    second = _enter_in_thread(admission, order, 2)
    _wait_for(lambda: admission.waiting == 2)
    time.sleep(0.05)
    assert order == [] and admission.inside == 2
    admission.leave()
    first.join(timeout=5)
    assert order == [1]
    admission.leave()
    second.join(timeout=5)
    assert order == [1, 2] and admission.inside == 2 and admission.waiting == 0


def test_grants_let_the_head_in_without_anyone_leaving() -> None:
    clock = Clock()
    admission = Admission(qps=10, window_s=1, floor_s=0.1, clock=clock)
    admission.enter()  # the floor: 1
    order: list[int] = []
    waiter = _enter_in_thread(admission, order, 1)
    _wait_for(lambda: admission.waiting == 1)
    clock.now += 1
    for _ in range(5):  # 5/s x 1 s: room for 5
        admission.granted()
    waiter.join(timeout=5)  # the head looks again on its own (HEAD_RECHECK_S)
    assert order == [1] and admission.inside == 2


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="qps"):
        Admission(qps=0, window_s=5)


def test_at_shutdown_every_waiter_goes_in_at_once() -> None:
    admission = Admission(qps=1, window_s=1, floor_s=1)
    admission.enter()
    order: list[int] = []
    waiters = [_enter_in_thread(admission, order, n) for n in range(3)]
    _wait_for(lambda: admission.waiting == 3)
    admission.open_all()
    for waiter in waiters:
        waiter.join(timeout=5)
    assert sorted(order) == [0, 1, 2] and admission.waiting == 0
    admission.enter()  # and later ones do not wait either
    assert admission.inside == 5
