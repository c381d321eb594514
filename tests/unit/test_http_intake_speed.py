"""What makes the HTTP intake fast without changing what it does: concurrent publishes
grouped into one flush (`worker.broker.shared.Combiner`), and one pre-flight decode per
distinct image (`worker.tencent.preflight.Preflight`), a batch's or a manifest chunk's work
per distinct image and request (`worker.producer.Preparer`, `spec_from_json`'s cache)."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from emulator.specimen import make_specimen
from worker import producer
from worker.broker.shared import Combiner
from worker.errors import InputError
from worker.http.intake import spec_from_json, validate
from worker.http.schemas import JobRequest
from worker.producer import JobSpec, Preparer
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


def test_a_batch_decodes_each_base64_text_once_and_checks_each_distinct_job_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[OcrRequest] = []
    rules = Preflight(resolve=lambda host: [], min_side_px=100)
    real_check = rules.check

    def counting(request: OcrRequest) -> None:
        checked.append(request)
        real_check(request)

    monkeypatch.setattr(rules, "check", counting)
    card = make_specimen(seed=1).image
    text = base64.b64encode(card).decode()
    decoded: dict[str, bytes] = {}
    preparer = Preparer(rules)
    jobs = [
        JobRequest.model_validate({"front": {"base64": text}, "tag": f"t{i}"}) for i in range(4)
    ]
    requests = [validate(spec_from_json(job, decoded), preparer) for job in jobs]
    assert len(decoded) == 1 and decoded[text] == card
    assert len(checked) == 1  # one request checked, shared by the four jobs
    assert all(r.front is not None and r.front.data is decoded[text] for r in requests)
    # A portrait flag or another side makes another request, checked on its own.
    portrait = spec_from_json(
        JobRequest.model_validate({"front": {"base64": text}, "portrait": True}), decoded
    )
    assert validate(portrait, preparer).portrait is True
    assert len(checked) == 2
    # The tag is each job's own: checked for every job.
    with pytest.raises(InputError) as refused:
        validate(JobSpec(front=decoded[text], tag="a\x00b"), preparer)
    assert refused.value.rule == "tag_bad_character"


def test_every_job_of_a_bad_image_is_refused_with_the_same_rule() -> None:
    preparer = Preparer(Preflight(resolve=lambda host: [], min_side_px=100))
    card = make_specimen(seed=1).image
    cut = card[: len(card) // 2]
    for _ in range(3):
        with pytest.raises(InputError) as refused:
            preparer.prepare(JobSpec(front=cut))
        assert refused.value.rule == "image_undecodable"
        assert refused.value.code == "Input.image_undecodable"


def test_a_file_named_by_many_rows_is_read_once_per_preparer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    reads: list[Path] = []
    real = producer.read_image_file

    def counting(path: Path, side: str) -> bytes:
        reads.append(path)
        return real(path, side)

    monkeypatch.setattr(producer, "read_image_file", counting)
    card = tmp_path / "card.jpg"
    card.write_bytes(make_specimen(seed=3).image)
    rules = Preflight(resolve=lambda host: [], min_side_px=100)
    preparer = Preparer(rules)
    requests = [preparer.prepare(JobSpec(front=card, tag=f"r{i}")) for i in range(5)]
    assert reads == [card]
    assert len({id(r) for r in requests}) == 1
    # A missing file is refused for each row that names it (not remembered).
    for _ in range(2):
        with pytest.raises(InputError) as refused:
            preparer.prepare(JobSpec(front=tmp_path / "gone.jpg"))
        assert refused.value.rule == "file_not_found"
    # A new preparer (the next chunk) reads the file again.
    Preparer(rules).prepare(JobSpec(front=card))
    assert reads == [card, tmp_path / "gone.jpg", tmp_path / "gone.jpg", card]
