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
from worker.http.intake import request_digest, spec_digest, spec_from_json, validate
from worker.http.problems import ProblemError, not_found
from worker.http.responses import AUTH, NOT_FOUND, SUBMIT, body
from worker.http.routes_jobs import REPLAYED, IdempotencyKey
from worker.http.schemas import BatchCreated, BatchOut, BatchRequest, ReplayOut
from worker.http.services import CallerDep, Services, ServicesDep
from worker.producer import MAX_LABEL_CHARS, JobSpec, Preparer, make_preflight, submit_many
from worker.replay import replay
from worker.tenants import Caller
from worker.tencent.preflight import Preflight
from worker.tencent.types import OcrRequest

router = APIRouter(tags=["batches"])


def _specs(request: BatchRequest, preflight: Preflight) -> tuple[list[JobSpec], list[OcrRequest]]:
    """Every job checked (with what the check made of it); one or more bad ones refuse the
    batch, listing each bad index."""
    if request.name is not None and len(request.name) > MAX_LABEL_CHARS:
        raise InputError(
            "batch_too_long", f"name is over {MAX_LABEL_CHARS} characters (rule batch_too_long)"
        )
    specs: list[JobSpec] = []
    checked: list[OcrRequest] = []
    errors: list[dict[str, Any]] = []
    # Work per distinct image, not per job: each base64 text decoded once, and jobs of the
    # same images (and portrait flag) checked once. The request holds every image anyway.
    decoded: dict[str, bytes] = {}
    preparer = Preparer(preflight)
    for index, job in enumerate(request.jobs):
        try:
            if job.batch is not None:
                raise InputError(
                    "batch_field",
                    "a job of a batch takes the batch's name: leave out batch (rule batch_field)",
                )
            spec = spec_from_json(job, decoded)
            checked.append(validate(spec, preparer))
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
    return specs, checked


def _store(
    svc: Services,
    who: Caller,
    name: str | None,
    specs: list[JobSpec],
    checked: list[OcrRequest],
    created: dict[str, Any],
    claim: idempotency.Claim | None,
    preflight: Preflight,
) -> None:
    """The batch row (its total first: a batch cannot look complete while its later chunks
    commit, and with a key, the key's seal in the same transaction), then its jobs."""
    sessions = svc.sessions(who.tenant)
    batch_id = uuid.UUID(created["batch_id"])
    with sessions() as session, session.begin():
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
        if claim is not None:
            idempotency.seal(session, claim)
    try:
        submit_many(
            sessions,
            svc.publisher,
            svc.for_tenant(who.tenant),
            specs,
            batch=name or str(batch_id),
            batch_id=batch_id,
            job_ids=[uuid.UUID(job["job_id"]) for job in created["jobs"]],
            preflight=preflight,
            checked=checked,
            sealer=svc.sealer,
        )
    except BaseException:
        # Chunks committed before the error stay: the total says how many there are.
        with sessions() as session, session.begin():
            stored = select(func.count()).where(Job.batch_id == batch_id).scalar_subquery()
            session.execute(update(Batch).where(Batch.id == batch_id).values(total=stored))
        if claim is not None:
            # Free the key (a retry makes a new batch), though the seal committed.
            idempotency.abandon(sessions, claim, sealed=True)
        raise


def _create(svc: Services, who: Caller, request: BatchRequest, key: str | None) -> JSONResponse:
    # One set of rules for the checks and the store: each distinct image is decoded once.
    preflight = make_preflight(svc.settings)
    specs, checked = _specs(request, preflight)
    batch_id = uuid.uuid4()
    # Every id made up front: with a key, the whole answer is claimed before any work.
    created: dict[str, Any] = {
        "batch_id": str(batch_id),
        "name": request.name,
        "jobs": [{"job_id": str(uuid.uuid4())} for _ in specs],
    }
    if key is None:
        svc.backlog.admit(who.tenant, len(specs))
        _store(svc, who, request.name, specs, checked, created, None, preflight)
    else:
        sessions = svc.sessions(who.tenant)
        hashed: dict[int, str] = {}  # by id() of bytes the specs hold
        content = {"name": request.name, "jobs": [spec_digest(s, None, hashed) for s in specs]}
        digest = request_digest(svc.sealer, "batch", content)
        while True:
            outcome = idempotency.begin(
                sessions, who.tenant, key, digest, batch_id=batch_id, response=json.dumps(created)
            )
            if isinstance(outcome, idempotency.Done):
                if outcome.response is None:  # a job's key (its digest differs anyway)
                    raise idempotency.conflict()
                return JSONResponse(json.loads(outcome.response), headers=REPLAYED)
            try:
                svc.backlog.admit(who.tenant, len(specs))
            except BaseException:
                idempotency.abandon(sessions, outcome)
                raise
            try:
                _store(svc, who, request.name, specs, checked, created, outcome, preflight)
                break
            except idempotency.ClaimLost:
                continue  # taken over while this request was slow: answer the taker's batch
            except BaseException:
                idempotency.abandon(sessions, outcome)
                raise
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
    with svc.sessions(tenant)() as session:
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
        svc.sessions(who.tenant),
        svc.publisher,
        svc.for_tenant(who.tenant),
        batch_id=batch_id,
        error_code=error_code,
        actor=f"api:{who.key_id}",
        reason=None,
        sealer=svc.sealer,
    )
    return JSONResponse(report.to_dict())
