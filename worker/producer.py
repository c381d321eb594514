"""Submitting jobs: validate everything, commit the rows, and only then publish their ids.

A job that is committed but not published (broker down, producer killed) is not lost: its
`enqueued_at` stays NULL and the sweeper publishes it. The reverse (a message for a row that
does not exist yet) cannot happen, because publishing waits for the commit.

Many jobs (`submit_many`, the CLI manifest) go in chunks: per chunk one query finds the images
already stored, one multi-row INSERT adds the new ones, one the jobs, one commit, and then
one pipelined publish of the chunk's ids (`CeleryPublisher`). A chunk that fails to commit
publishes nothing; the chunks before it stay submitted.
"""

from __future__ import annotations

import csv
import hashlib
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import Image, Job, JobStatus
from models.base import utcnow
from worker.broker.publish import Publisher
from worker.errors import InputError
from worker.settings import Settings
from worker.store.images import CONTENT_TYPES, store_image
from worker.tencent.types import ImageInput, OcrRequest
from worker.tencent.validation import sniff_image_type, validate_request

log = structlog.get_logger(__name__)

# A http(s) URL string, a file path (Path, or a str without "://"), or the image bytes.
Source = str | Path | bytes
ProgressFn = Callable[[int, int], None]

CHUNK_ROWS = 500
JOB_TABLE: Table = Job.__table__  # type: ignore[assignment]
IMAGE_TABLE: Table = Image.__table__  # type: ignore[assignment]
MAX_LABEL_CHARS = 200  # job.tag and job.batch columns
MANIFEST_COLUMNS = ("front", "back", "tag")


@dataclass(frozen=True)
class JobSpec:
    """One job to submit. `line` numbers a manifest row in error messages."""

    front: Source | None
    back: Source | None = None
    portrait: bool = False
    tag: str | None = None
    line: int | None = None

    def __repr__(self) -> str:
        # Paths and URLs may carry names or signed tokens.
        return f"JobSpec(line={self.line}, portrait={self.portrait})"


@dataclass(frozen=True)
class RowProblem:
    line: int
    rule: str
    message: str


class ManifestError(InputError):
    """Some rows of a manifest break a rule: nothing of it was submitted."""

    def __init__(self, problems: Sequence[RowProblem]) -> None:
        self.problems = list(problems)
        lines = "; ".join(f"line {p.line}: {p.message}" for p in self.problems)
        super().__init__("manifest", f"{len(self.problems)} bad row(s), nothing submitted: {lines}")
        # Keep the code of the first row's rule: callers branch on it as for a single job.
        self.rule = self.problems[0].rule if self.problems else "manifest"


def _is_url(text: str) -> bool:
    return "://" in text


def _resolve(source: Source | None, side: str) -> ImageInput | None:
    """Turn a source into what the API gets: a URL, or the file's / the caller's bytes."""
    if source is None:
        return None
    if isinstance(source, bytes):
        return ImageInput(data=source)
    if isinstance(source, str) and _is_url(source):
        return ImageInput(url=source)
    path = Path(source)
    try:
        return ImageInput(data=path.read_bytes())
    except FileNotFoundError:
        raise InputError(
            "file_not_found", f"{side} image file not found: {path} (rule file_not_found)"
        ) from None
    except OSError as exc:
        raise InputError(
            "file_unreadable",
            f"{side} image file cannot be read: {path}: {exc.strerror} (rule file_unreadable)",
        ) from None


def _check_label(value: str | None, what: str) -> None:
    if value is not None and len(value) > MAX_LABEL_CHARS:
        raise InputError(
            f"{what}_too_long",
            f"{what} is over {MAX_LABEL_CHARS} characters (rule {what}_too_long)",
        )


def prepare(spec: JobSpec) -> OcrRequest:
    """Read and validate one job's inputs; raises InputError naming the rule."""
    _check_label(spec.tag, "tag")
    request = OcrRequest(
        front=_resolve(spec.front, "front"),
        back=_resolve(spec.back, "back"),
        portrait=spec.portrait,
    )
    validate_request(request)
    return request


def _side_columns(
    session: Session, tenant: str, image: ImageInput | None
) -> tuple[str | None, uuid.UUID | None]:
    if image is None:
        return None, None
    if image.url is not None:
        return image.url, None
    stored = store_image(session, tenant, image.data or b"")
    session.flush()  # assigns the id, and lets the next identical image find this one
    return None, stored.id


def _add_job(
    session: Session,
    settings: Settings,
    request: OcrRequest,
    spec: JobSpec,
    batch: str | None,
    batch_id: uuid.UUID | None = None,
) -> uuid.UUID:
    front_url, front_image_id = _side_columns(session, settings.tenant, request.front)
    back_url, back_image_id = _side_columns(session, settings.tenant, request.back)
    job = Job(
        id=uuid.uuid4(),
        tenant=settings.tenant,
        status=JobStatus.queued,
        front_url=front_url,
        front_image_id=front_image_id,
        back_url=back_url,
        back_image_id=back_image_id,
        portrait=request.portrait,
        tag=spec.tag,
        batch=batch,
        batch_id=batch_id,
        attempts=0,
        api_calls=0,
    )
    session.add(job)
    return job.id


def _publish(
    session_factory: sessionmaker[Session], publisher: Publisher, job_ids: Sequence[uuid.UUID]
) -> bool:
    """Publish committed jobs, then record when. A broker failure is logged, not raised:
    the rows are safe and the sweeper publishes jobs whose enqueued_at is NULL."""
    try:
        publisher.publish(job_ids)
    except Exception as exc:
        # Only the type: a broker error's text may hold the broker URL and its password.
        log.warning(
            "publish_failed",
            jobs=len(job_ids),
            error_type=type(exc).__name__,
            first_job_id=str(job_ids[0]),
        )
        return False
    with session_factory() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.enqueued_at.is_(None))
            .values(enqueued_at=utcnow())
        )
        session.commit()
    return True


def submit(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    front: Source | None,
    back: Source | None = None,
    *,
    portrait: bool = False,
    tag: str | None = None,
    batch: str | None = None,
) -> uuid.UUID:
    """Validate, commit and publish one job; returns its id (also if the broker is down)."""
    _check_label(batch, "batch")
    spec = JobSpec(front=front, back=back, portrait=portrait, tag=tag)
    request = prepare(spec)
    with session_factory() as session:
        job_id = _add_job(session, settings, request, spec, batch)
        session.commit()
    published = _publish(session_factory, publisher, [job_id])
    log.info("job_submitted", job_id=str(job_id), published=published)
    return job_id


def _validate_all(specs: Sequence[JobSpec]) -> None:
    problems: list[RowProblem] = []
    for index, spec in enumerate(specs, start=1):
        try:
            prepare(spec)
        except InputError as exc:
            problems.append(RowProblem(spec.line or index, exc.rule, exc.message))
    if problems:
        raise ManifestError(problems)


def _chunks(specs: Sequence[JobSpec], size: int) -> Iterator[Sequence[JobSpec]]:
    for start in range(0, len(specs), size):
        yield specs[start : start + size]


def submit_many(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    items: Iterable[JobSpec],
    *,
    batch: str | None = None,
    batch_id: uuid.UUID | None = None,
    progress: ProgressFn | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> list[uuid.UUID]:
    """All-or-nothing validation of every item (ManifestError lists each bad row), then
    commit in chunks, publishing each chunk after its commit. Ids come back in input order.
    `batch_id` names an existing batch row (whose `total` counts these jobs).

    Files are read twice (validate, then store) rather than all held in memory; a file that
    changes in between fails its chunk, and earlier chunks stay submitted.
    """
    _check_label(batch, "batch")
    specs = list(items)
    _validate_all(specs)
    ids: list[uuid.UUID] = []
    unpublished = 0
    for chunk in _chunks(specs, chunk_rows):
        requests = [prepare(spec) for spec in chunk]
        with session_factory() as session:
            chunk_ids = _insert_chunk(session, settings.tenant, requests, chunk, batch, batch_id)
            session.commit()
        if not _publish(session_factory, publisher, chunk_ids):
            unpublished += len(chunk_ids)
        ids.extend(chunk_ids)
        if progress is not None:
            progress(len(ids), len(specs))
    log.info("jobs_submitted", jobs=len(ids), unpublished=unpublished)
    return ids


ImageKey = tuple[str, int]  # (sha256, size): how the image table finds a tenant's duplicate


def _image_key(data: bytes) -> ImageKey:
    return hashlib.sha256(data).hexdigest(), len(data)


def _chunk_images(
    session: Session, tenant: str, requests: Sequence[OcrRequest]
) -> dict[int, uuid.UUID]:
    """The image id of every uploaded side of the chunk, by `id()` of its bytes: found (one
    query) or inserted (one multi-row INSERT). The same bytes twice are stored once, as
    `store_image` does."""
    wanted: dict[ImageKey, bytes] = {}
    key_of: dict[int, ImageKey] = {}
    for request in requests:
        for side in (request.front, request.back):
            if side is not None and side.data is not None:
                key = key_of[id(side.data)] = _image_key(side.data)
                wanted.setdefault(key, side.data)
    if not wanted:
        return {}
    ids: dict[ImageKey, uuid.UUID] = {}
    found = session.execute(
        select(IMAGE_TABLE.c.id, IMAGE_TABLE.c.sha256, IMAGE_TABLE.c.size_bytes).where(
            IMAGE_TABLE.c.tenant == tenant,
            IMAGE_TABLE.c.sha256.in_(sorted({sha for sha, _ in wanted})),
        )
    )
    for row in found:
        ids.setdefault((row.sha256, row.size_bytes), row.id)
    now = utcnow()
    rows = []
    for key, data in wanted.items():
        if key in ids:
            continue
        kind = sniff_image_type(data)
        if kind is None:  # validated already; a file changed since is refused here
            raise InputError(
                "not_png_or_jpeg", "image is neither PNG nor JPEG (rule not_png_or_jpeg)"
            )
        ids[key] = uuid.uuid4()
        rows.append(
            {
                "id": ids[key],
                "tenant": tenant,
                "sha256": key[0],
                "content_type": CONTENT_TYPES[kind],
                "size_bytes": key[1],
                "data": data,
                "created_at": now,
            }
        )
    if rows:
        session.execute(insert(IMAGE_TABLE), rows)
    return {data_id: ids[key] for data_id, key in key_of.items()}


def _insert_chunk(
    session: Session,
    tenant: str,
    requests: Sequence[OcrRequest],
    specs: Sequence[JobSpec],
    batch: str | None,
    batch_id: uuid.UUID | None = None,
) -> list[uuid.UUID]:
    """The chunk's images and jobs as multi-row INSERTs (not committed); ids in order."""
    images = _chunk_images(session, tenant, requests)

    def side(image: ImageInput | None) -> tuple[str | None, uuid.UUID | None]:
        if image is None:
            return None, None
        if image.url is not None:
            return image.url, None
        return None, images[id(image.data)]

    now = utcnow()
    ids = [uuid.uuid4() for _ in specs]
    rows = []
    for job_id, request, spec in zip(ids, requests, specs, strict=True):
        front_url, front_image_id = side(request.front)
        back_url, back_image_id = side(request.back)
        rows.append(
            {
                "id": job_id,
                "tenant": tenant,
                "status": JobStatus.queued,
                "front_url": front_url,
                "front_image_id": front_image_id,
                "back_url": back_url,
                "back_image_id": back_image_id,
                "portrait": request.portrait,
                "tag": spec.tag,
                "batch": batch,
                "batch_id": batch_id,
                "attempts": 0,
                "api_calls": 0,
                "created_at": now,
            }
        )
    # One statement: SQLAlchemy sends an executemany of one INSERT as multi-row VALUES.
    session.execute(insert(JOB_TABLE), rows)
    return ids


def read_manifest(path: Path, *, portrait: bool = False) -> list[JobSpec]:
    """Rows of a CSV with columns front, back, tag (a header line). Relative file paths are
    resolved against the CSV's folder; URLs are kept as they are."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(
            "file_not_found", f"manifest file not found: {path} (rule file_not_found)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            "file_unreadable", f"manifest cannot be read: {path}: {exc} (rule file_unreadable)"
        ) from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    unknown = sorted(set(columns) - set(MANIFEST_COLUMNS))
    if ("front" not in columns and "back" not in columns) or unknown:
        raise InputError(
            "manifest_columns",
            f"manifest header must name columns among {', '.join(MANIFEST_COLUMNS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + " (rule manifest_columns)",
        )
    reader.fieldnames = columns
    folder = path.parent
    specs: list[JobSpec] = []
    for row in reader:
        specs.append(
            JobSpec(
                front=_manifest_source(_cell(row, "front"), folder),
                back=_manifest_source(_cell(row, "back"), folder),
                portrait=portrait,
                tag=_cell(row, "tag"),
                line=reader.line_num,
            )
        )
    return specs


def _cell(row: dict[str, str | None], name: str) -> str | None:
    value = (row.get(name) or "").strip()
    return value or None


def _manifest_source(value: str | None, folder: Path) -> Source | None:
    if value is None:
        return None
    if _is_url(value):
        return value
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path
