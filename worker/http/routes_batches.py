"""`/v1/batches`: up to 10,000 jobs in one request, all validated first; progress in O(1)."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import func, select, update
from starlette.concurrency import run_in_threadpool

from models import Batch, Job
from models.base import utcnow
from worker.errors import InputError
from worker.http import idempotency
from worker.http.intake import request_sha256, spec_digest, spec_from_json, validate
from worker.http.problems import ProblemError, not_found
from worker.http.responses import AUTH, NOT_FOUND, SUBMIT, body
from worker.http.routes_jobs import REPLAYED, IdempotencyKey
from worker.http.schemas import BatchCreated, BatchOut, BatchRequest, ReplayOut
from worker.http.services import CallerDep, Services, ServicesDep
from worker.producer import MAX_LABEL_CHARS, JobSpec, submit_many
from worker.replay import replay
from worker.tenants import Caller

router = APIRouter(tags=["batches"])


def _specs(request: BatchRequest) -> list[JobSpec]:
    """Every job checked; one or more bad ones refuse the batch, listing each bad index."""
    if request.name is not None and len(request.name) > MAX_LABEL_CHARS:
        raise InputError(
            "batch_too_long", f"name is over {MAX_LABEL_CHARS} characters (rule batch_too_long)"
        )
    specs: list[JobSpec] = []
    errors: list[dict[str, Any]] = []
    for index, job in enumerate(request.jobs):
        try:
            if job.batch is not None:
                raise InputError(
                    "batch_field",
                    "a job of a batch takes the batch's name: leave out batch (rule batch_field)",
                )
            spec = spec_from_json(job)
            validate(spec)
            specs.append(spec)
        except InputError as exc:
            errors.append(
                {"index": index, "rule": exc.rule, "code": exc.code, "message": exc.message}
            )
    if errors:
        raise ProblemError(
            422,
            "batch_rejected",
            "Batch refused",
            f"{len(errors)} bad job(s) of {len(request.jobs)}; nothing was stored",
            kind="batch-rejected",
            errors=errors,
        )
    return specs


def _store(svc: Services, who: Caller, name: str | None, specs: list[JobSpec]) -> dict[str, Any]:
    batch_id = uuid.uuid4()
    with svc.session_factory() as session, session.begin():
        # The total first: a batch cannot look complete while its later chunks commit.
        session.add(
            Batch(
                id=batch_id,
                tenant=who.tenant,
                name=name,
                total=len(specs),
                succeeded=0,
                failed=0,
                created_at=utcnow(),
            )
        )
    try:
        ids = submit_many(
            svc.session_factory,
            svc.publisher,
            svc.for_tenant(who.tenant),
            specs,
            batch=name or str(batch_id),
            batch_id=batch_id,
            sealer=svc.sealer,
        )
    except BaseException:
        # Chunks committed before the error stay: the total says how many there are.
        with svc.session_factory() as session, session.begin():
            stored = select(func.count()).where(Job.batch_id == batch_id).scalar_subquery()
            session.execute(update(Batch).where(Batch.id == batch_id).values(total=stored))
        raise
    return {
        "batch_id": str(batch_id),
        "name": name,
        "jobs": [{"job_id": str(i)} for i in ids],
    }


def _create(svc: Services, who: Caller, request: BatchRequest, key: str | None) -> JSONResponse:
    specs = _specs(request)
    if key is not None:
        content = {"name": request.name, "jobs": [spec_digest(s, None) for s in specs]}
        done = idempotency.begin(
            svc.session_factory, who.tenant, key, request_sha256("batch", content)
        )
        if done is not None and done.response is not None:
            return JSONResponse(json.loads(done.response), headers=REPLAYED)
    try:
        svc.backlog.admit(who.tenant, len(specs))
        created = _store(svc, who, request.name, specs)
    except BaseException:
        if key is not None:
            idempotency.abandon(svc.session_factory, who.tenant, key)
        raise
    if key is not None:
        idempotency.complete(
            svc.session_factory,
            who.tenant,
            key,
            batch_id=uuid.UUID(created["batch_id"]),
            response=json.dumps(created),
        )
    return JSONResponse(
        created, status_code=201, headers={"Location": f"/v1/batches/{created['batch_id']}"}
    )


@router.post(
    "/v1/batches",
    summary="Submit up to 10,000 cards at once",
    status_code=201,
    response_model=None,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}
            },
        }
    },
    responses={
        201: body(BatchCreated, "Queued.", Location="The batch's URL."),
        200: body(
            BatchCreated,
            "Answered again for a used Idempotency-Key.",
            **{"Idempotent-Replayed": "true"},
        ),
        **AUTH,
        **SUBMIT,
    },
)
async def create_batch(
    request: Request, who: CallerDep, svc: ServicesDep, key: IdempotencyKey = None
) -> JSONResponse:
    """All jobs validated first (a 422 lists every bad index; nothing stored), then queued."""
    # Read here, after the key is checked: an anonymous caller never makes us parse a batch.
    try:
        parsed = BatchRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_input=False)) from None
    return await run_in_threadpool(_create, svc, who, parsed, key)


def _load(svc: Services, tenant: str, batch_id: uuid.UUID) -> Batch:
    with svc.session_factory() as session:
        batch = session.scalars(
            select(Batch).where(Batch.id == batch_id, Batch.tenant == tenant)
        ).first()
    if batch is None:
        raise not_found("batch")
    return batch


@router.get(
    "/v1/batches/{batch_id}",
    summary="A batch's progress (one row read)",
    response_model=None,
    responses={200: body(BatchOut, "Counts by status."), **AUTH, **NOT_FOUND},
)
def get_batch(batch_id: uuid.UUID, who: CallerDep, svc: ServicesDep) -> JSONResponse:
    batch = _load(svc, who.tenant, batch_id)
    done = batch.succeeded + batch.failed
    return JSONResponse(
        {
            "batch_id": str(batch.id),
            "name": batch.name,
            "created_at": batch.created_at.isoformat(),
            "total": batch.total,
            "counts": {
                "pending": batch.total - done,
                "succeeded": batch.succeeded,
                "failed": batch.failed,
            },
            "completed": done >= batch.total,
        }
    )


@router.post(
    "/v1/batches/{batch_id}/replay",
    summary="Send a batch's failed jobs round again",
    response_model=None,
    responses={200: body(ReplayOut, "What was replayed."), **AUTH, **NOT_FOUND},
)
def replay_batch(
    batch_id: uuid.UUID,
    who: CallerDep,
    svc: ServicesDep,
    error_code: Annotated[str | None, Query(description="Only jobs that failed so.")] = None,
) -> JSONResponse:
    """As `macao-ocr replay --batch ... [--error-code ...]`, audited with the key's id."""
    _load(svc, who.tenant, batch_id)
    report = replay(
        svc.session_factory,
        svc.publisher,
        svc.for_tenant(who.tenant),
        batch_id=batch_id,
        error_code=error_code,
        actor=f"api:{who.key_id}",
        reason=None,
        sealer=svc.sealer,
    )
    return JSONResponse(report.to_dict())
