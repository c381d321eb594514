"""What makes the HTTP intake fast without changing what it does: concurrent publishes
grouped into one flush (`worker.broker.shared.Combiner`), and one pre-flight decode per
distinct image (`worker.tencent.preflight.Preflight`)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from emulator.specimen import make_specimen
from worker.broker.shared import Combiner
from worker.errors import InputError
from worker.tencent import preflight as preflight_module
from worker.tencent.preflight import Preflight
from worker.tencent.types import ImageInput, OcrRequest


def test_items_handed_in_during_a_flush_go_out_together_in_the_next() -> None:
    flushed: list[list[int]] = []
    first_running, release = threading.Event(), threading.Event()

    def flush(items: list[int]) -> int:
        flushed.append(list(items))
        if len(flushed) == 1:
            first_running.set()
            assert release.wait(10)
        return len(flushed)

    combiner: Combiner[int, int] = Combiner(flush)
    with ThreadPoolExecutor(12) as pool:
        first = pool.submit(combiner.submit, [0])
        assert first_running.wait(10)
        rest = [pool.submit(combiner.submit, [i]) for i in range(1, 11)]
        # Every later caller is waiting on the running flush before it ends.
        while sum(len(g) for g in [combiner._pending]) < 10:
            threading.Event().wait(0.01)
        release.set()
        assert first.result(10) == 1
        assert {f.result(10) for f in rest} == {2}
    assert flushed == [[0], list(range(1, 11))]


def test_a_flush_error_reaches_every_caller_of_that_flush_only() -> None:
    calls: list[list[str]] = []

    def flush(items: list[str]) -> None:
        calls.append(items)
        if "bad" in items:
            raise ConnectionError("broker down")

    combiner: Combiner[str, None] = Combiner(flush)
    with pytest.raises(ConnectionError):
        combiner.submit(["bad"])
    combiner.submit(["good"])
    assert calls == [["bad"], ["good"]]


def test_preflight_decodes_the_same_image_bytes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    real = preflight_module.check_image_decodes

    def counting(data: bytes, side: str, *, min_side_px: int) -> tuple[int, int]:
        decoded.append(len(data))
        return real(data, side, min_side_px=min_side_px)

    monkeypatch.setattr(preflight_module, "check_image_decodes", counting)
    rules = Preflight(resolve=lambda host: [], min_side_px=100)
    card, other = make_specimen(seed=1).image, make_specimen(seed=2).image
    for data in (card, card, other, card):
        rules.check(OcrRequest(front=ImageInput(data=data)))
    assert len(decoded) == 2
    cut = card[: len(card) // 2]
    for _ in range(2):
        with pytest.raises(InputError) as refused:
            rules.check(OcrRequest(front=ImageInput(data=cut)))
        assert refused.value.rule == "image_undecodable"
    assert len(decoded) == 3
