"""`/v1/jobs`: submit one job (JSON or multipart), read it, its portrait, list, replay."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import or_, select, tuple_
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models import Job, JobStatus, Portrait
from worker.errors import InputError
from worker.http import idempotency
from worker.http.grouped import PendingJob
from worker.http.intake import (
    request_digest,
    spec_digest,
    spec_from_form,
    spec_from_json,
    validate,
)
from worker.http.problems import ProblemError, not_found
from worker.http.responses import AUTH, NOT_FOUND, SUBMIT, body, problem
from worker.http.schemas import JobOut, JobPage, JobRequest, ReplayOut, ReplayRequest
from worker.http.services import CallerDep, Services, ServicesDep
from worker.producer import JobSpec, Preparer, check_label, make_preflight
from worker.replay import replay
from worker.store import access
from worker.store.lookup import LOOKUP_OFF, job_ids_by_id_number
from worker.store.views import job_view
from worker.tenants import Caller
from worker.tencent.types import OcrRequest

router = APIRouter(tags=["jobs"])

MAX_PAGE = 1000
REPLAYED = {"Idempotent-Replayed": "true"}
_FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "front": {"type": "string", "format": "binary"},
        "back": {"type": "string", "format": "binary"},
        "portrait": {"type": "boolean"},
        "tag": {"type": "string"},
        "batch": {"type": "string"},
    },
}
# One endpoint, two encodings: documented here, parsed by hand below.
_JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
            "multipart/form-data": {"schema": _FORM_SCHEMA},
        },
    }
}


async def _read_job(request: Request) -> tuple[JobSpec, str | None]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json":
        raw = await request.body()
        try:
            parsed = JobRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_input=False)) from None
        return spec_from_json(parsed), parsed.batch
    if media == "multipart/form-data":
        form = await request.form(max_files=2, max_fields=8)
        files: dict[str, bytes | None] = {"front": None, "back": None}
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in files:
                    raise InputError(
                        "form_fields", f"unknown file field {name[:40]!r} (rule form_fields)"
                    )
                files[name] = await value.read()
            else:
                fields[name] = value
        return spec_from_form(files["front"], files["back"], fields)
    raise ProblemError(
        415,
        "unsupported_media_type",
        "Unsupported media type",
        "send application/json or multipart/form-data",
    )


def _load(session: Session, tenant: str, job_id: uuid.UUID) -> Job:
    job = session.scalars(select(Job).where(Job.id == job_id, Job.tenant == tenant)).first()
    if job is None:
        raise not_found("job")
    return job


def actor(who: Caller) -> str:
    """The access log's and history's name for an API caller."""
    return f"key:{who.key_id}"


def _log_reads(svc: Services, who: Caller, how: str, job_ids: list[uuid.UUID]) -> None:
    """One access_log row per job whose personal fields the answer shows (committed first)."""
    reads = [access.Read(tenant=who.tenant, job_id=job_id) for job_id in job_ids]
    access.record(svc.sessions(who.tenant), actor=actor(who), how=how, reads=reads)


def job_json(
    svc: Services, who: Caller, job_id: uuid.UUID, *, history: bool = False
) -> dict[str, Any]:
    with svc.sessions(who.tenant)() as session:
        job = _load(session, who.tenant, job_id)
        view = job_view(session, job, sealer=svc.sealer, history=history)
        personal = access.with_personal_fields(session, [job_id])
    _log_reads(svc, who, access.API_JOB, list(personal))
    return view


def _submit(
    svc: Services,
    who: Caller,
    request: OcrRequest,
    spec: JobSpec,
    batch: str | None,
    claim: idempotency.Claim | None = None,
) -> tuple[uuid.UUID, dict[str, Any]]:
    """Store the job (and the key's seal) in a transaction shared with the requests of the
    moment, then publish it with them (worker.http.grouped): the job's id and its view."""
    svc.backlog.admit(who.tenant, 1)
    job_id = uuid.uuid4() if claim is None else claim.job_id or uuid.uuid4()
    view = svc.groups.store(
        PendingJob(
            tenant=who.tenant,
            job_id=job_id,
            request=request,
            tag=spec.tag,
            batch=batch,
            claim=claim,
        )
    )
    return job_id, view


def _create(
    svc: Services, who: Caller, spec: JobSpec, batch: str | None, key: str | None
) -> JSONResponse:
    check_label(batch, "batch")
    # One set of rules for the check and the store: the image is decoded once.
    request = validate(spec, Preparer(make_preflight(svc.settings)))
    if key is None:
        job_id, view = _submit(svc, who, request, spec, batch)
    else:
        sessions = svc.sessions(who.tenant)
        digest = request_digest(svc.sealer, "job", spec_digest(spec, batch))
        while True:
            outcome = idempotency.begin(sessions, who.tenant, key, digest, job_id=uuid.uuid4())
            if isinstance(outcome, idempotency.Done):
                if outcome.job_id is None:  # a batch's key (its digest differs anyway)
                    raise idempotency.conflict()
                return JSONResponse(job_json(svc, who, outcome.job_id), headers=REPLAYED)
            try:
                # The job row and the key's seal commit together (idempotency's module doc).
                job_id, view = _submit(svc, who, request, spec, batch, outcome)
                break
            except idempotency.ClaimLost:
                continue  # taken over while this request was slow: answer the taker's job
            except BaseException:
                idempotency.abandon(sessions, outcome)
                raise
    return JSONResponse(view, status_code=201, headers={"Location": f"/v1/jobs/{job_id}"})


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=idempotency.MAX_KEY_CHARS,
        description="Any string: the same key with the same request returns the same job.",
    ),
]


@router.post(
    "/v1/jobs",
    summary="Submit one card",
    status_code=201,
    response_model=None,
    openapi_extra=_JOB_BODY,
    responses={
        201: body(JobOut, "Queued.", Location="The job's URL."),
        200: body(
            JobOut, "Answered again for a used Idempotency-Key.", **{"Idempotent-Replayed": "true"}
        ),
        **AUTH,
        **SUBMIT,
    },
)
async def create_job(
    request: Request, who: CallerDep, svc: ServicesDep, key: IdempotencyKey = None
) -> Response:
    """Validate (as the CLI does: a refused input costs no API call) and queue one card."""
    spec, batch = await _read_job(request)
    return await run_in_threadpool(_create, svc, who, spec, batch, key)


@router.get(
    "/v1/jobs/{job_id}",
    summary="A job: status, result, warnings",
    response_model=None,
    responses={200: body(JobOut, "The job."), **AUTH, **NOT_FOUND},
)
def get_job(
    job_id: uuid.UUID,
    who: CallerDep,
    svc: ServicesDep,
    history: Annotated[bool, Query(description="Every API call and event.")] = False,
) -> JSONResponse:
    return JSONResponse(job_json(svc, who, job_id, history=history))


@router.get(
    "/v1/jobs/{job_id}/portrait",
    summary="The card's portrait image",
    response_class=Response,
    responses={
        200: {
            "description": "The portrait (JPEG or PNG).",
            "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **AUTH,
        **NOT_FOUND,
    },
)
def get_portrait(job_id: uuid.UUID, who: CallerDep, svc: ServicesDep) -> Response:
    from worker.tencent.validation import sniff_image_type

    with svc.sessions(who.tenant)() as session:
        _load(session, who.tenant, job_id)
        portrait = session.get(Portrait, job_id)
    if portrait is not None:
        _log_reads(svc, who, access.API_PORTRAIT, [job_id])
    if portrait is None:
        raise ProblemError(
            404,
            "portrait_not_found",
            "Not found",
            "no portrait: not asked for, or the job has no result yet",
        )
    data = svc.sealer.open_portrait(job_id, portrait.data)
    kind = sniff_image_type(data)
    media = f"image/{kind}" if kind else "application/octet-stream"
    return Response(data, media_type=media, headers={"Cache-Control": "no-store"})


def _cursor(job: Job) -> str:
    text = json.dumps([job.created_at.isoformat(), str(job.id)])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, job_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return datetime.fromisoformat(at), uuid.UUID(job_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(
            422, "invalid_cursor", "Invalid cursor", "pass back a next_cursor as it was given"
        ) from None


@router.get(
    "/v1/jobs",
    summary="List jobs (keyset pages, oldest first)",
    response_model=None,
    responses={200: body(JobPage, "One page."), **AUTH},
)
def list_jobs(
    who: CallerDep,
    svc: ServicesDep,
    status: JobStatus | None = None,
    batch: Annotated[str | None, Query(description="A batch id or batch label.")] = None,
    error_code: str | None = None,
    created_after: datetime | None = None,
    id_number: Annotated[
        str | None,
        Query(description="The jobs of one card number (keyed hash; needs MACAO_OCR_LOOKUP_KEY)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
) -> JSONResponse:
    query = select(Job).where(Job.tenant == who.tenant)
    if id_number is not None:
        if svc.sealer.lookup_key is None:
            raise ProblemError(400, "lookup_disabled", "Lookup by ID number is off", LOOKUP_OFF)
        with svc.session_factory() as session:
            ids = job_ids_by_id_number(session, svc.sealer.lookup_keys, id_number, who.tenant)
        query = query.where(Job.id.in_(ids))
    if status is not None:
        query = query.where(Job.status == status)
    if batch is not None:
        query = query.where(_batch_filter(batch))
    if error_code is not None:
        query = query.where(Job.last_error_code == error_code)
    if created_after is not None:
        if created_after.tzinfo is None:
            created_after = created_after.replace(tzinfo=UTC)
        query = query.where(Job.created_at > created_after)
    if cursor is not None:
        at, last_id = _parse_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) > tuple_(at, last_id))
    query = query.order_by(Job.created_at, Job.id).limit(limit + 1)
    with svc.sessions(who.tenant)() as session:
        jobs = list(session.scalars(query))
        page = jobs[:limit]
        views = [job_view(session, job, sealer=svc.sealer) for job in page]
        personal = access.with_personal_fields(session, [job.id for job in page])
    _log_reads(svc, who, access.API_JOBS, [job.id for job in page if job.id in personal])
    next_cursor = _cursor(page[-1]) if len(jobs) > limit else None
    return JSONResponse({"jobs": views, "next_cursor": next_cursor})


def _batch_filter(batch: str) -> Any:
    try:
        batch_id = uuid.UUID(batch)
    except ValueError:
        return Job.batch == batch
    return or_(Job.batch_id == batch_id, Job.batch == batch)


def _replay_job(
    svc: Services, who: Caller, job_id: uuid.UUID, options: ReplayRequest
) -> JSONResponse:
    sessions = svc.sessions(who.tenant)
    with sessions() as session:
        _load(session, who.tenant, job_id)
    report = replay(
        sessions,
        svc.publisher,
        svc.for_tenant(who.tenant),
        job_ids=[job_id],
        actor=f"api:{who.key_id}",  # the replay event's actor, as before
        reason=options.reason,
        force=options.force,
        sealer=svc.sealer,
    )
    if job_id in report.refused:
        # `code` is the refusal's own (`Replay.ImagesDeleted`, `Replay.Erased`...); the type
        # stays `replay_refused` for every one of them.
        raise ProblemError(
            409,
            report.refused_codes.get(job_id, "replay_refused"),
            "Replay refused",
            report.refused[job_id],
            kind="replay_refused",
        )
    return JSONResponse(report.to_dict())


@router.post(
    "/v1/jobs/{job_id}/replay",
    summary="Send a failed (or, with force, succeeded) job round again",
    response_model=None,
    responses={
        200: body(ReplayOut, "Queued again."),
        409: problem(
            "In flight, succeeded without force, its images deleted by retention "
            "(`Replay.ImagesDeleted`) or erased (`Replay.Erased`)."
        ),
        **AUTH,
        **NOT_FOUND,
    },
)
def replay_job(
    job_id: uuid.UUID,
    who: CallerDep,
    svc: ServicesDep,
    options: Annotated[ReplayRequest | None, Body()] = None,
) -> JSONResponse:
    """As `macao-ocr replay JOB_ID`, audited with the API key's id as the actor."""
    return _replay_job(svc, who, job_id, options or ReplayRequest())
