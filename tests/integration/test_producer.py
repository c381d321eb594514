"""The producer: validate everything, commit, then publish; never lose a committed job."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from PIL import Image as PILImage
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from models import Image, Job, JobStatus
from tests.fixtures.workers import sealer_for_tests
from worker.broker.publish import QUEUE, TASK_NAME, CeleryPublisher, RecordingPublisher
from worker.errors import InputError
from worker.producer import JobSpec, ManifestError, read_manifest, submit, submit_many
from worker.settings import Settings
from worker.store.images import load_request, store_image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    # Above the pre-flight's minimum side (200 px by default).
    PILImage.new("RGB", (240, 200), color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def settings() -> Settings:
    return Settings(tenant="tenant-c")


def count(session: Session, model: type[object]) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


@pytest.fixture
def committed(
    fresh_migrated_database: Callable[[], str],
) -> Iterator[tuple[sessionmaker[Session], sa.Engine]]:
    """A really committing sessionmaker plus an engine for a second, independent connection."""
    url = fresh_migrated_database()
    engine = sa.create_engine(url)
    observer = sa.create_engine(url)
    yield sessionmaker(engine, expire_on_commit=False), observer
    engine.dispose()
    observer.dispose()


def test_rows_are_committed_before_publish(
    committed: tuple[sessionmaker[Session], sa.Engine], settings: Settings
) -> None:
    factory, observer = committed
    seen: list[tuple[str, object]] = []

    def look(job_ids: Sequence[uuid.UUID]) -> None:
        # Another connection: it only sees what is committed.
        with observer.connect() as conn:
            for row in conn.execute(
                sa.select(Job.status, Job.enqueued_at).where(Job.id.in_(job_ids))
            ):
                seen.append((row.status, row.enqueued_at))

    publisher = RecordingPublisher(on_publish=look)
    job_id = submit(
        factory, publisher, settings, image_bytes(), tag="t-1", sealer=sealer_for_tests()
    )

    assert publisher.published == [job_id]
    assert seen == [(JobStatus.queued, None)]
    with factory() as session:
        job = session.get_one(Job, job_id)
        assert job.enqueued_at is not None
        assert job.tenant == "tenant-c"
        assert job.tag == "t-1"


def test_submit_many_publishes_each_chunk_after_its_commit(
    committed: tuple[sessionmaker[Session], sa.Engine], settings: Settings
) -> None:
    factory, observer = committed
    visible_at_publish: list[int] = []

    def look(job_ids: Sequence[uuid.UUID]) -> None:
        with observer.connect() as conn:
            visible_at_publish.append(
                conn.scalar(sa.select(sa.func.count()).select_from(Job).where(Job.id.in_(job_ids)))
                or 0
            )

    publisher = RecordingPublisher(on_publish=look)
    specs = [JobSpec(front=image_bytes(color=(i, 0, 0)), tag=f"row-{i}") for i in range(5)]
    progress: list[tuple[int, int]] = []
    ids = submit_many(
        factory,
        publisher,
        settings,
        specs,
        batch="b1",
        chunk_rows=2,
        progress=lambda done, total: progress.append((done, total)),
        sealer=sealer_for_tests(),
    )

    assert [len(b) for b in publisher.batches] == [2, 2, 1]
    assert visible_at_publish == [2, 2, 1]
    assert publisher.published == ids
    assert progress == [(2, 5), (4, 5), (5, 5)]
    with factory() as session:
        tags = {j.id: j.tag for j in session.scalars(sa.select(Job))}
        assert [tags[i] for i in ids] == [f"row-{i}" for i in range(5)]
        assert all(
            j.enqueued_at is not None and j.batch == "b1" for j in session.scalars(sa.select(Job))
        )


def test_broker_down_keeps_jobs_for_the_sweeper(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    publisher = RecordingPublisher(fail=True)
    with capture_logs() as logs:
        job_id = submit(
            session_factory,
            publisher,
            settings,
            "https://example.com/card.jpg?sig=x",
            sealer=sealer_for_tests(),
        )
        ids = submit_many(
            session_factory,
            publisher,
            settings,
            [JobSpec(front=image_bytes())] * 3,
            sealer=sealer_for_tests(),
        )

    assert publisher.published == []
    with session_factory() as session:
        for jid in [job_id, *ids]:
            job = session.get_one(Job, jid)
            assert job.status == JobStatus.queued
            assert job.enqueued_at is None
    failures = [e for e in logs if e["event"] == "publish_failed"]
    assert [e["jobs"] for e in failures] == [1, 3]
    assert all(e["log_level"] == "warning" for e in failures)
    assert "sig=x" not in repr(logs)


BAD_INPUTS: list[tuple[str, dict[str, object]]] = [
    ("no_image", {"front": None}),
    ("empty_image", {"front": b""}),
    ("gif_not_supported", {"front": b"GIF89a" + b"\x00" * 20}),
    ("not_png_or_jpeg", {"front": b"%PDF-1.4 not an image"}),
    ("image_too_large", {"front": PNG_MAGIC + b"\x00" * (6 * 1024 * 1024)}),
    (
        "request_too_large",
        {
            "front": PNG_MAGIC + b"\x00" * (5 * 1024 * 1024),
            "back": PNG_MAGIC + b"\x01" * (5 * 1024 * 1024),
        },
    ),
    ("bad_url", {"front": "ftp://example.com/card.jpg"}),
    ("bad_url", {"front": "https:///no-host.jpg"}),
    ("file_not_found", {"front": Path("/nonexistent/dir/card.png")}),
    ("tag_too_long", {"front": b"", "tag": "x" * 201}),
    ("batch_too_long", {"front": b"", "batch": "x" * 201}),
]


@pytest.mark.parametrize(("rule", "kwargs"), BAD_INPUTS, ids=[r for r, _ in BAD_INPUTS])
def test_bad_input_is_refused_and_nothing_written(
    session_factory: sessionmaker[Session],
    db_session: Session,
    settings: Settings,
    rule: str,
    kwargs: dict[str, object],
) -> None:
    publisher = RecordingPublisher()
    front = kwargs.pop("front")
    with pytest.raises(InputError) as info:
        submit(session_factory, publisher, settings, front, sealer=sealer_for_tests(), **kwargs)  # type: ignore[arg-type]
    assert info.value.rule == rule
    assert rule in str(info.value)
    assert publisher.published == []
    assert count(db_session, Job) == 0
    assert count(db_session, Image) == 0


def test_missing_file_error_names_the_path(
    session_factory: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    missing = tmp_path / "gone.png"
    with pytest.raises(InputError, match=r"gone\.png"):
        submit(session_factory, RecordingPublisher(), settings, missing, sealer=sealer_for_tests())


def test_manifest_is_all_or_nothing(
    session_factory: sessionmaker[Session], db_session: Session, settings: Settings
) -> None:
    specs = [
        JobSpec(front=image_bytes(), line=2),
        JobSpec(front=b"GIF89a....", line=3),
        JobSpec(front=image_bytes(), back="https://example.com/b.jpg", line=4),
        JobSpec(front=None, line=5),
        JobSpec(front=image_bytes(), line=6),
    ]
    publisher = RecordingPublisher()
    with pytest.raises(ManifestError) as info:
        submit_many(session_factory, publisher, settings, specs, sealer=sealer_for_tests())
    assert [(p.line, p.rule) for p in info.value.problems] == [
        (3, "gif_not_supported"),
        (5, "no_image"),
    ]
    assert "line 3" in str(info.value) and "line 5" in str(info.value)
    assert publisher.published == []
    assert count(db_session, Job) == 0
    assert count(db_session, Image) == 0


def test_image_stored_once_and_loadable(
    session_factory: sessionmaker[Session], db_session: Session, settings: Settings
) -> None:
    data = image_bytes("JPEG")
    publisher = RecordingPublisher()
    first = submit(
        session_factory, publisher, settings, data, portrait=True, sealer=sealer_for_tests()
    )
    second = submit(
        session_factory,
        publisher,
        settings,
        data,
        "https://example.com/back.png",
        sealer=sealer_for_tests(),
    )

    images = db_session.scalars(sa.select(Image)).all()
    assert len(images) == 1
    assert images[0].content_type == "image/jpeg"
    assert images[0].size_bytes == len(data)
    assert images[0].tenant == "tenant-c"

    request = load_request(db_session, sealer_for_tests(), db_session.get_one(Job, first))
    assert request.front is not None and request.front.data == data
    assert request.back is None
    assert request.portrait is True
    request = load_request(db_session, sealer_for_tests(), db_session.get_one(Job, second))
    assert request.front is not None and request.front.data == data
    assert request.back is not None and request.back.url == "https://example.com/back.png"
    assert request.portrait is False


def test_identical_image_of_another_tenant_is_not_shared(db_session: Session) -> None:
    data = image_bytes()
    a = store_image(db_session, sealer_for_tests(), "a", data)
    db_session.flush()
    assert store_image(db_session, sealer_for_tests(), "a", data) is a
    b = store_image(db_session, sealer_for_tests(), "b", data)
    db_session.flush()
    assert b.id != a.id


def test_files_and_manifest(
    session_factory: sessionmaker[Session],
    db_session: Session,
    settings: Settings,
    tmp_path: Path,
) -> None:
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "f1.png").write_bytes(image_bytes())
    (tmp_path / "cards" / "b1.jpg").write_bytes(image_bytes("JPEG"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "front,back,tag\ncards/f1.png,cards/b1.jpg,first\nhttps://example.com/f.png,,second\n"
    )
    specs = read_manifest(manifest, portrait=True)
    assert [s.line for s in specs] == [2, 3]
    assert specs[0].front == tmp_path / "cards" / "f1.png"
    assert specs[1].front == "https://example.com/f.png" and specs[1].back is None
    assert all(s.portrait for s in specs)

    ids = submit_many(
        session_factory, RecordingPublisher(), settings, specs, sealer=sealer_for_tests()
    )
    first = db_session.get_one(Job, ids[0])
    assert (first.tag, first.front_url, first.portrait) == ("first", None, True)
    request = load_request(db_session, sealer_for_tests(), first)
    assert request.back is not None
    assert request.back.data == (tmp_path / "cards" / "b1.jpg").read_bytes()
    second = db_session.get_one(Job, ids[1])
    url = sealer_for_tests().open_url(second.id, "front_url", second.front_url)
    assert url == "https://example.com/f.png"


def test_manifest_header_is_checked(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label\na.png,x\n")
    with pytest.raises(InputError) as info:
        read_manifest(manifest)
    assert info.value.rule == "manifest_columns"
    assert "label" in str(info.value)


def test_celery_publisher_sends_only_the_job_id(clean_redis: str) -> None:
    app = Celery("test-producer", broker=clean_redis)
    app.conf.task_serializer = "json"
    ids = [uuid.uuid4(), uuid.uuid4(), uuid.uuid4()]
    CeleryPublisher(app).publish(ids)

    client = redis.Redis.from_url(clean_redis)
    raw = client.lrange(QUEUE, 0, -1)
    messages = [json.loads(m) for m in raw]
    assert len(messages) == 3
    assert {m["headers"]["task"] for m in messages} == {TASK_NAME}
    import base64

    bodies = [json.loads(base64.b64decode(m["body"])) for m in messages]
    assert sorted(b[0][0] for b in bodies) == sorted(str(i) for i in ids)
    assert all(b[0] == [b[0][0]] and b[1] == {} for b in bodies)
    # No pool to close: the publisher used a connection of its own. (kombu's pools are
    # global per broker URL; force-closing one would break every later app on that URL.)
    app.close()


def test_a_held_connection_keeps_its_sender_and_makes_a_new_one_after_a_failure(
    clean_redis: str,
) -> None:
    from worker.broker.shared import SharedConnectionPublisher

    app = Celery("test-producer", broker=clean_redis)
    app.conf.task_send_sent_event = True
    publisher = SharedConnectionPublisher(app)
    client = redis.Redis.from_url(clean_redis)
    try:
        publisher.publish([uuid.uuid4(), uuid.uuid4()])
        sender = publisher._sender
        publisher.publish([uuid.uuid4()])
        assert publisher._sender is sender and client.llen(QUEUE) == 3
        # The queue's binding is there as send_task leaves it (declared once, not per message).
        assert client.smembers(f"_kombu.binding.{QUEUE}")
        publisher._drop()  # what a failed send does
        publisher.publish([uuid.uuid4(), uuid.uuid4()])
        assert publisher._sender is not None and publisher._sender is not sender
        assert client.llen(QUEUE) == 5
    finally:
        publisher.close()
        app.close()


def test_sqlite_embedded_default(tmp_path: Path) -> None:
    import migrations
    from worker.store.engine import make_engine, make_sessionmaker

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", tenant="solo")
    migrations.upgrade(settings.database_url)
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    data = image_bytes()
    ids = submit_many(
        factory,
        RecordingPublisher(),
        settings,
        [JobSpec(front=data), JobSpec(front=data)],
        sealer=sealer_for_tests(),
    )
    with factory() as session:
        assert count(session, Image) == 1
        job = session.get_one(Job, ids[1])
        assert job.enqueued_at is not None and job.enqueued_at.tzinfo is not None
        front = load_request(session, sealer_for_tests(), job).front
        assert front is not None and front.data == data
    engine.dispose()


def test_a_chunk_that_fails_to_commit_publishes_nothing(
    committed: tuple[sessionmaker[Session], sa.Engine], settings: Settings
) -> None:
    factory, observer = committed
    commits = 0

    def fail_second_chunk(_session: Session) -> None:
        nonlocal commits
        commits += 1
        # Commits: chunk 1, chunk 1's enqueued_at, chunk 2 (refused here).
        if commits == 3:
            raise sa.exc.OperationalError("COMMIT", {}, ConnectionError("server closed"))

    sa.event.listen(factory, "before_commit", fail_second_chunk)
    publisher = RecordingPublisher()
    specs = [JobSpec(front=image_bytes(color=(i, 9, 9)), tag=f"row-{i}") for i in range(6)]
    with pytest.raises(sa.exc.OperationalError):
        submit_many(factory, publisher, settings, specs, chunk_rows=2, sealer=sealer_for_tests())

    assert len(publisher.batches) == 1
    with observer.connect() as conn:
        stored = set(conn.scalars(sa.select(Job.id)))
        tags = set(conn.scalars(sa.select(Job.tag)))
    assert stored == set(publisher.batches[0])
    assert tags == {"row-0", "row-1"}


def test_a_chunk_is_one_insert_of_its_jobs_and_one_of_its_new_images(
    committed: tuple[sessionmaker[Session], sa.Engine], settings: Settings
) -> None:
    factory, observer = committed
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split("(")[0].strip())

    engine = factory.kw["bind"]
    sa.event.listen(engine, "before_cursor_execute", record)
    shared = image_bytes(color=(1, 2, 3))
    specs = [JobSpec(front=shared if i % 2 else image_bytes(color=(i, 0, 5))) for i in range(8)]
    ids = submit_many(
        factory, RecordingPublisher(), settings, specs, chunk_rows=4, sealer=sealer_for_tests()
    )

    assert statements.count("INSERT INTO job") == 2
    assert statements.count("INSERT INTO image") == 2
    with observer.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Image)) == 5  # 4 + shared
        assert conn.scalar(sa.select(sa.func.count()).select_from(Job)) == 8
    with factory() as session:
        for job_id, spec in zip(ids, specs, strict=True):
            request = load_request(session, sealer_for_tests(), session.get_one(Job, job_id))
            assert request.front is not None and request.front.data == spec.front


def test_a_manifest_repeating_a_file_reads_and_digests_it_once_a_chunk(
    session_factory: sessionmaker[Session],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes(color=(9, 9, 9)))
    (tmp_path / "b.jpg").write_bytes(image_bytes("JPEG"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "front,tag\n" + "".join(f"{('a.png', 'b.jpg')[i % 2]},r{i}\n" for i in range(6))
    )
    sealer = sealer_for_tests()
    digests: list[int] = []
    real_digest = sealer.image_digest

    def counting(data: bytes) -> str:
        digests.append(len(data))
        return real_digest(data)

    monkeypatch.setattr(sealer, "image_digest", counting)
    specs = read_manifest(manifest)
    ids = submit_many(
        session_factory, RecordingPublisher(), settings, specs, chunk_rows=3, sealer=sealer
    )
    # Two chunks of three rows naming both files: two digests a chunk, not three.
    assert len(digests) == 4
    with session_factory() as session:
        assert count(session, Image) == 2
        for job_id, spec in zip(ids, specs, strict=True):
            request = load_request(session, sealer_for_tests(), session.get_one(Job, job_id))
            assert request.front is not None
            assert request.front.data == Path(str(spec.front)).read_bytes()
            assert session.get_one(Job, job_id).tag == spec.tag
