"""What retention costs: the worker's success path with and without migration 0009's indexes,
and the sweeper's retention pass per job.

    python -m bench.retention [--jobs 300] [--rounds 3] [--pg-prefix macao_ocr_ret]

A fresh migrated PostgreSQL database; each round stores `--jobs` queued jobs (one stored
60 KB image each) and runs `process_job` for each in one thread with a client that answers
at once (as bench.pipeline_cpu), alternating rounds with the indexes 0009 adds on `job` and
`result` dropped and recreated. Then the sweeper's retention (`purge`) deletes what every
round left (image retention 0: every succeeded job's images are due), timed per job, and
an idle pass (nothing due) is timed too.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import sqlalchemy as sa

from bench import _harness as h
from bench._harness import keys_env
from bench.pipeline_cpu import InstantClient
from models import Job
from worker.logs import configure_logging
from worker.pipeline import Outcome, PipelineDeps, process_job
from worker.privacy.seal import Sealer
from worker.quota.circuit_memory import MemoryAccountCircuit
from worker.quota.limiter_memory import MemoryRateLimiter
from worker.runtime import LoopThread
from worker.settings import Settings
from worker.store.engine import make_autocommit_engine, make_engine, make_sessionmaker
from worker.store.images import store_image
from worker.store.retention import purge

INDEXES = {
    "ix_job_front_image_id": "job (front_image_id) WHERE front_image_id IS NOT NULL",
    "ix_job_back_image_id": "job (back_image_id) WHERE back_image_id IS NOT NULL",
    "ix_job_images_held": (
        "job (status, finished_at) "
        "WHERE images_deleted_at IS NULL AND status IN ('succeeded', 'failed')"
    ),
    "ix_job_erased_at": "job (erased_at) WHERE erased_at IS NOT NULL",
    "ix_result_personal_held": "result (created_at) WHERE personal_deleted_at IS NULL",
}


def _set_indexes(engine: sa.Engine, present: bool) -> None:
    with engine.begin() as conn:
        for name, spec in INDEXES.items():
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
            if present:
                conn.exec_driver_sql(f"CREATE INDEX {name} ON {spec}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind")
    parser.add_argument("--pg-prefix", default="macao_ocr_ret")
    parser.add_argument(
        "--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()

    url = h.create_database(args.pg_admin_url, args.pg_prefix)
    loop = LoopThread()
    try:
        settings = Settings(
            database_url=url,
            qps=0,
            log_level="WARNING",
            data_keys=keys_env()["MACAO_OCR_DATA_KEYS"],
        )
        sealer = Sealer.from_settings(settings)
        configure_logging(settings)
        engine = make_engine(settings, pool_pre_ping=False)
        autocommit = make_autocommit_engine(settings, pool_pre_ping=False)
        assert autocommit is not None
        sessions = make_sessionmaker(engine)
        deps = PipelineDeps(
            settings=settings,
            transaction=engine.begin,
            statement=autocommit.begin,
            client=InstantClient(),
            limiter=MemoryRateLimiter(0, 1),
            circuit=MemoryAccountCircuit(),
            limiter_key="k",
            run=loop.run,
            sealer=sealer,
            validate=lambda request: None,
        )
        wall: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        done = 0
        for present in [True, False] * args.rounds:
            _set_indexes(engine, present)
            with sessions() as session, session.begin():
                jobs = []
                for _ in range(args.jobs):
                    # Distinct bytes: every job owns its image, as most do.
                    image = store_image(
                        session,
                        sealer,
                        settings.tenant,
                        b"\xff\xd8\xff" + uuid.uuid4().bytes * 3750,
                    )
                    session.flush()
                    jobs.append(Job(tenant=settings.tenant, front_image_id=image.id))
                session.add_all(jobs)
            ids = [str(j.id) for j in jobs]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            outcomes = [process_job(job_id, deps) for job_id in ids]
            cpu[present].append((time.process_time() - cpu0) * 1000 / len(ids))
            wall[present].append((time.perf_counter() - wall0) * 1000 / len(ids))
            assert all(o is Outcome.succeeded for o in outcomes), set(outcomes)
            done += len(ids)
        for present in (True, False):
            label = "with 0009 indexes   " if present else "without 0009 indexes"
            print(
                f"{label}: {statistics.median(wall[present]):.2f} ms wall/job "
                f"(rounds {[round(w, 2) for w in wall[present]]}), "
                f"{statistics.median(cpu[present]):.2f} ms CPU/job"
            )
        _set_indexes(engine, True)
        started = time.perf_counter()
        report = purge(make_sessionmaker(engine), settings)
        elapsed_ms = (time.perf_counter() - started) * 1000
        removed = report.removed
        print(
            f"retention of {removed.jobs_images} succeeded jobs ({removed.images} images): "
            f"{elapsed_ms:.0f} ms, {elapsed_ms / max(1, removed.jobs_images):.3f} ms/job"
        )
        started = time.perf_counter()
        for _ in range(20):
            purge(make_sessionmaker(engine), settings, max_batches=1)
        print(f"idle retention pass: {(time.perf_counter() - started) * 1000 / 20:.1f} ms")
        engine.dispose()
        autocommit.dispose()
    finally:
        loop.stop()
        h.drop_database(args.pg_admin_url, url)


if __name__ == "__main__":
    main()
