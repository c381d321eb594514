"""Encryption at rest, end to end on PostgreSQL with a real worker process and the emulator:
a `pg_dump` after a run holds no personal value in plaintext, and `keys rotate` while a
worker runs leaves every job readable and nothing under the old key."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from emulator.specimen import make_specimen
from models import TERMINAL_STATUSES, Image, Job, KeptAnswer, Portrait, Result
from tests.fixtures.workers import StartWorkers, cli_env
from worker.broker.publish import RecordingPublisher
from worker.privacy.crypto import KeyRing, generate_entry, key_id_of
from worker.privacy.fields import JOB_PERSONAL_COLUMNS, RESULT_PERSONAL_COLUMNS
from worker.privacy.seal import Sealer
from worker.producer import JobSpec, submit, submit_many
from worker.settings import Settings
from worker.store.engine import make_engine, make_sessionmaker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MACAO_OCR = str(Path(sys.executable).parent / "macao-ocr")
NAME_FIELDS = ("CnLastName", "EnLastName", "CnFirstName", "EnFirstName")


def _settings(env: dict[str, str]) -> Settings:
    return Settings(
        database_url=env["MACAO_OCR_DATABASE_URL"],
        broker_url=env["MACAO_OCR_BROKER_URL"],
        data_keys=env["MACAO_OCR_DATA_KEYS"],
        lookup_key=env["MACAO_OCR_LOOKUP_KEY"],
        url_allow_loopback=True,
    )


@pytest.fixture
def db(worker_env: dict[str, str]) -> Iterator[sa.Engine]:
    engine = sa.create_engine(worker_env["MACAO_OCR_DATABASE_URL"])
    yield engine
    engine.dispose()


def _wait_terminal(engine: sa.Engine, ids: Sequence[uuid.UUID], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with Session(engine) as session:
            statuses = list(session.scalars(sa.select(Job.status).where(Job.id.in_(ids))))
        if len(statuses) == len(ids) and all(s in TERMINAL_STATUSES for s in statuses):
            return
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.3)


def _pg_dump(url: str) -> bytes:
    libpq = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    proc = subprocess.run(
        ["pg_dump", "--data-only", "--no-owner", libpq], capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-500:]
    return proc.stdout


def _forms(data: bytes) -> list[bytes]:
    """A distinctive run of bytes as a dump could hold it: raw, hex (bytea), base64."""
    return [data, data.hex().encode(), base64.b64encode(data)]


def _runs(blob: bytes, n: int = 3, size: int = 48) -> list[bytes]:
    """`n` runs of `size` bytes from the middle of `blob` (past headers shared by every JPEG)."""
    step = max(1, (len(blob) - 2 * size) // (n + 1))
    return [blob[size + i * step : 2 * size + i * step] for i in range(n)]


def _leaks(dump: bytes, needles: dict[str, bytes]) -> list[str]:
    """Which needles the dump holds (their labels only: never print the values)."""
    lowered = dump.lower()
    return [label for label, needle in needles.items() if needle.lower() in lowered]


def test_a_dump_after_a_run_holds_no_personal_data_in_plaintext(
    worker_env: dict[str, str], celery_workers: StartWorkers, db: sa.Engine
) -> None:
    # Images kept past success (retention would delete them): the dump must hold them sealed.
    worker_env = {**worker_env, "MACAO_OCR_IMAGE_RETENTION_S": "86400"}
    settings = _settings(worker_env)
    sealer = Sealer.from_settings(settings)
    specimens = [make_specimen(4200 + i) for i in range(6)]
    token = f"tok{secrets.token_hex(12)}"
    url = f"http://127.0.0.1:9/card.jpg?token={token}"
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    try:
        publisher = RecordingPublisher()
        specs = [
            JobSpec(front=s.image, portrait=True, tag=f"c{i}") for i, s in enumerate(specimens)
        ]
        ids = submit_many(factory, publisher, settings, specs, sealer=sealer)
        # A URL job (its token is personal too); never published: it is only stored.
        url_job = submit(factory, RecordingPublisher(), settings, url, sealer=sealer)
    finally:
        engine.dispose()
    workers = celery_workers(worker_env, n=1, concurrency=8)
    from worker.app import create_app
    from worker.broker.publish import CeleryPublisher

    app = create_app(settings)
    try:
        CeleryPublisher(app).publish(ids)
    finally:
        app.close()
    _wait_terminal(db, ids, timeout_s=120)
    workers.stop()

    with Session(db) as session:
        portraits = {
            p.job_id: sealer.open_portrait(p.job_id, p.data)
            for p in session.scalars(sa.select(Portrait))
        }
        results = list(session.scalars(sa.select(Result).where(Result.job_id.in_(ids))))
    assert len(results) == len(ids) and len(portraits) == len(ids)
    with Session(db) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Image)) == len(ids)

    needles: dict[str, bytes] = {}
    for i, spec in enumerate(specimens):
        truth = spec.truth
        for field in NAME_FIELDS:
            value = truth[field] or ""
            # Short Latin names ("HO") are too common as bytes to mean anything.
            if len(value.encode()) >= 4:
                needles[f"card{i}.{field}"] = value.encode()
        needles[f"card{i}.ID"] = truth["ID"].encode()
        day, month, year = truth["Birthday"].split("-")
        needles[f"card{i}.birthday.api"] = truth["Birthday"].encode()
        needles[f"card{i}.birthday.iso"] = f"{year}-{month}-{day}".encode()
        for k, run in enumerate(_runs(spec.image)):
            for j, form in enumerate(_forms(run)):
                needles[f"card{i}.image.run{k}.form{j}"] = form
    for n, data in enumerate(portraits.values()):
        for k, run in enumerate(_runs(data)):
            for j, form in enumerate(_forms(run)):
                needles[f"portrait{n}.run{k}.form{j}"] = form
    needles["url.token"] = token.encode()

    dump = _pg_dump(worker_env["MACAO_OCR_DATABASE_URL"])
    # The scan scans something: the jobs are in the dump, their values sealed under our key.
    assert str(ids[0]).encode() in dump and str(url_job).encode() in dump
    assert bytes((1, 4)).hex().encode() + b"test".hex().encode() in dump
    assert _leaks(dump, needles) == []

    # Lookup by ID number goes through the keyed hash (and is off without its key).
    wanted = specimens[0].truth["ID"]
    found = subprocess.run(
        [MACAO_OCR, "jobs", "--id-number", wanted, "--json", "--full-ids"],
        env=cli_env(worker_env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr[-300:]
    rows = [json.loads(line) for line in found.stdout.splitlines() if line.strip()]
    assert [r["job_id"] for r in rows] == [str(ids[0])]
    off = subprocess.run(
        [MACAO_OCR, "jobs", "--id-number", wanted, "--json"],
        env=cli_env({k: v for k, v in worker_env.items() if k != "MACAO_OCR_LOOKUP_KEY"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert off.returncode != 0 and json.loads(off.stderr)["error"]["code"] == "lookup_disabled"
    assert wanted not in off.stderr


def _key_ids(engine: sa.Engine) -> dict[str, set[str]]:
    """The key id of every sealed value, by table.column."""
    found: dict[str, set[str]] = {}
    columns: list[tuple[Any, tuple[str, ...]]] = [
        (Job, JOB_PERSONAL_COLUMNS),
        (Result, RESULT_PERSONAL_COLUMNS),
        (Image, ("data",)),
        (Portrait, ("data",)),
        (KeptAnswer, ("response_json",)),
    ]
    with Session(engine) as session:
        for model, names in columns:
            for name in names:
                for blob in session.scalars(sa.select(getattr(model, name))):
                    if blob is not None:
                        found.setdefault(f"{model.__tablename__}.{name}", set()).add(
                            key_id_of(bytes(blob))
                        )
    return found


def test_rotation_while_a_worker_runs_leaves_nothing_under_the_old_key(
    worker_env: dict[str, str], celery_workers: StartWorkers, db: sa.Engine, emulator: Any
) -> None:
    # Images kept (retention would delete them at success): their rotation is under test too.
    worker_env = {**worker_env, "MACAO_OCR_IMAGE_RETENTION_S": "86400"}
    old_ring = worker_env["MACAO_OCR_DATA_KEYS"]
    settings = _settings(worker_env)
    old = Sealer.from_settings(settings)
    # Jobs stored under the old key, read by a worker running with the old ring.
    engine = make_engine(settings)
    try:
        specs = [
            JobSpec(front=make_specimen(5100 + i).image, portrait=i % 2 == 0) for i in range(24)
        ]
        from worker.app import create_app
        from worker.broker.publish import CeleryPublisher

        workers = celery_workers(worker_env, n=1, concurrency=4)
        app = create_app(settings)
        try:
            first = submit_many(
                make_sessionmaker(engine), CeleryPublisher(app), settings, specs[:12], sealer=old
            )
        finally:
            app.close()
        _wait_terminal(db, first, timeout_s=120)
        workers.stop()

        # The new key goes first in the ring; the worker is restarted with it and keeps
        # working on new jobs while the rotation runs.
        new_ring = f"{generate_entry('new')},{old_ring}"
        new_env = {**worker_env, "MACAO_OCR_DATA_KEYS": new_ring}
        workers = celery_workers(new_env, n=1, concurrency=4)
        emulator.configure(latency_median_ms=150.0)
        new_settings = settings.model_copy(update={"data_keys": new_ring})
        new = Sealer(KeyRing.parse(new_ring), old.lookup_key)
        app = create_app(new_settings)
        try:
            second = submit_many(
                make_sessionmaker(engine),
                CeleryPublisher(app),
                new_settings,
                specs[12:],
                sealer=new,
            )
        finally:
            app.close()
        rotate = subprocess.run(
            [MACAO_OCR, "keys", "rotate", "--chunk-rows", "3", "--json"],
            env=cli_env(new_env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rotate.returncode in (0, 1), rotate.stderr
        summary = json.loads(rotate.stdout)
        assert summary["key_id"] == "new" and summary["values_total"] > 0
        _wait_terminal(db, second, timeout_s=120)
        workers.stop()
        # Resumable: a second run finds only what a worker wrote meanwhile, and then nothing.
        again = subprocess.run(
            [MACAO_OCR, "keys", "rotate", "--json"],
            env=cli_env(new_env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0, again.stderr
        assert sum(json.loads(again.stdout)["remaining"].values()) == 0
    finally:
        engine.dispose()

    key_ids = _key_ids(db)
    assert {"result.id_number", "image.data", "portrait.data"} <= set(key_ids)
    assert all(ids == {"new"} for ids in key_ids.values()), key_ids
    # Every job still reads, with the new ring only (the old key could now be dropped).
    only_new = Sealer(KeyRing.parse(new_ring.split(",")[0]), old.lookup_key)
    status = subprocess.run(
        [MACAO_OCR, "status", "--json", *(str(i) for i in first + second)],
        env=cli_env({**new_env, "MACAO_OCR_DATA_KEYS": new_ring.split(",")[0]}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr[-500:]
    views = [json.loads(line) for line in status.stdout.splitlines() if line.strip()]
    assert len(views) == 24 and all(v["status"] == "succeeded" for v in views)
    assert all(v["result"]["id_number"] for v in views)
    with Session(db) as session:
        for image in session.scalars(sa.select(Image)):
            data = only_new.open_image(image.id, image.data)
            assert data is not None and image.digest == only_new.image_digest(data)
