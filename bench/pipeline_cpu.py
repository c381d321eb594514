"""CPU per job of the pipeline's own work (SQL + bookkeeping), with an instant fake API.

    python -m bench.pipeline_cpu [--jobs 500] [--pg-admin-url URL]

A fresh migrated PostgreSQL database, N queued jobs with a stored 60 KB image, then
`process_job` for each in one thread with a client that answers at once: what is left is
the per-job cost the worker adds around a call. Prints CPU ms per job and a profile top.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from datetime import date
from decimal import Decimal

from bench import _harness as h
from bench._harness import keys_env
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
from worker.tencent.types import CardWarning, OcrRequest, OcrResult

RESULT = OcrResult(
    request_id="req",
    cn_last_name="陳",
    en_last_name="CHAN",
    id_number="1234567(8)",
    birthday=date(1990, 5, 17),
    height_m=Decimal("1.64"),
    warnings=(CardWarning(-9102, "photocopy"),),
)


class InstantClient:
    async def recognize(self, request: OcrRequest) -> OcrResult:
        return RESULT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--profile", action="store_true", help="print a cProfile top (slower)")
    parser.add_argument(
        "--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()

    url = h.create_database(args.pg_admin_url, "macao_ocr_cpu")
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
        image = b"\xff\xd8\xff" + bytes(60_000)
        with sessions() as session, session.begin():
            stored = store_image(session, sealer, settings.tenant, image)
            session.flush()
            jobs = [Job(tenant=settings.tenant, front_image_id=stored.id) for _ in range(args.jobs)]
            session.add_all(jobs)
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
        ids = [str(j.id) for j in jobs]
        warm, timed = ids[:20], ids[20:]
        for job_id in warm:
            process_job(job_id, deps)
        profile = cProfile.Profile()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if args.profile:
            profile.enable()
        outcomes = [process_job(job_id, deps) for job_id in timed]
        profile.disable()
        cpu_ms = (time.process_time() - cpu0) * 1000 / len(timed)
        wall_ms = (time.perf_counter() - wall0) * 1000 / len(timed)
        assert all(o is Outcome.succeeded for o in outcomes), set(outcomes)
        print(f"jobs {len(timed)}: {cpu_ms:.2f} ms CPU/job, {wall_ms:.2f} ms wall/job (one thread)")
        if args.profile:
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(25)
            print(out.getvalue())
        engine.dispose()
        autocommit.dispose()
    finally:
        loop.stop()
        h.drop_database(args.pg_admin_url, url)


if __name__ == "__main__":
    main()
