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
import itertools
import os
import stat
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import Image, Job, JobStatus
from models.base import utcnow
from worker.broker.publish import Publisher
from worker.errors import InputError
from worker.netpolicy import UrlPolicy
from worker.privacy.seal import Sealer
from worker.settings import Settings
from worker.store import batches
from worker.store.images import CONTENT_TYPES, store_image
from worker.tencent.preflight import Preflight
from worker.tencent.types import ImageInput, OcrRequest
from worker.tencent.urls import system_resolver
from worker.tencent.validation import (
    MAX_IMAGE_BASE64_BYTES,
    base64_size,
    sniff_image_type,
)

log = structlog.get_logger(__name__)

# A http(s) URL string, a file path (Path, or a str without "://"), or the image bytes.
Source = str | Path | bytes
ProgressFn = Callable[[int, int], None]
# Runs in the job's transaction, just before its commit (the HTTP API's idempotency seal).
BeforeCommit = Callable[[Session], None]

CHUNK_ROWS = 500
JOB_TABLE: Table = Job.__table__  # type: ignore[assignment]
IMAGE_TABLE: Table = Image.__table__  # type: ignore[assignment]
MAX_LABEL_CHARS = 200  # job.tag and job.batch columns
MANIFEST_COLUMNS = ("front", "back", "tag")
# Rows a manifest (or one submit_many) may hold: past it, refused before more is read.
MAX_ROWS = 100_000
# The largest raw image whose base64 fits the API's 7 MB: a bigger file is not even read.
MAX_FILE_BYTES = MAX_IMAGE_BASE64_BYTES // 4 * 3
# Control and format characters (bidi overrides U+202A-U+202E and U+2066-U+2069 are Cf),
# and line/paragraph separators: a label shows in tables and logs, and these rewrite them.
_LABEL_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def make_preflight(settings: Settings) -> Preflight:
    """The pre-flight rules as `settings` configure them (one per submit or manifest)."""
    return Preflight(
        resolve=system_resolver(settings.url_resolve_timeout_s),
        min_side_px=settings.min_image_side_px,
        policy=UrlPolicy(allow_loopback=settings.url_allow_loopback),
    )


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


def _inside(path: Path, base_dir: Path, side: str) -> None:
    """`path` (symlinks resolved) must lie inside `base_dir` (symlinks resolved)."""
    try:
        real = path.resolve(strict=False)
        base = base_dir.resolve(strict=False)
    except (OSError, RuntimeError):
        real, base = path, base_dir  # a symlink loop: judged as written, then fails to open
    if not real.is_relative_to(base):
        raise InputError(
            "outside_base_dir",
            f"{side} image file {path} is outside the base directory {base_dir} "
            "(rule outside_base_dir)",
        )


def read_image_file(path: Path, side: str) -> bytes:
    """A regular file's bytes, its size checked before reading (fstat of the opened file,
    so a file swapped after the check is still the one judged). Devices, FIFOs and
    directories are refused without blocking on them or reading them."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused right after.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(
            "file_not_found", f"{side} image file not found: {path} (rule file_not_found)"
        ) from None
    except OSError as exc:
        raise InputError(
            "file_unreadable",
            f"{side} image file cannot be read: {path}: {exc.strerror} (rule file_unreadable)",
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(
                "not_a_regular_file",
                f"{side} image {path} is not a regular file (a directory, device or FIFO) "
                "(rule not_a_regular_file)",
            )
        if info.st_size > MAX_FILE_BYTES:
            raise _file_too_large(path, side, info.st_size)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        try:
            # The size fstat gave and one byte more: asking for the cap itself would allocate
            # (and free) a 5 MB buffer per file, 7x the time of reading a 60 KB card. A file
            # that grew since fstat is read on to one byte over the cap, which tells it.
            data = handle.read(info.st_size + 1)
            if len(data) > info.st_size:
                data += handle.read(MAX_FILE_BYTES + 1 - len(data))
        except OSError as exc:
            raise InputError(
                "file_unreadable",
                f"{side} image file cannot be read: {path}: {exc.strerror} (rule file_unreadable)",
            ) from None
    if len(data) > MAX_FILE_BYTES:
        raise _file_too_large(path, side, len(data))
    return data


def _file_too_large(path: Path, side: str, size: int) -> InputError:
    return InputError(
        "image_too_large",
        f"{side} image file {path} is {size} bytes ({base64_size(size)} as base64), over the "
        f"{MAX_IMAGE_BASE64_BYTES}-byte limit; it was not read (rule image_too_large)",
    )


def _resolve(source: Source | None, side: str, base_dir: Path | None = None) -> ImageInput | None:
    """Turn a source into what the API gets: a URL, or the file's / the caller's bytes."""
    if source is None:
        return None
    if isinstance(source, bytes):
        return ImageInput(data=source)
    if isinstance(source, str) and _is_url(source):
        return ImageInput(url=source)
    path = Path(source)
    if base_dir is not None:
        _inside(path, base_dir, side)
    return ImageInput(data=read_image_file(path, side))


def check_label(value: str | None, what: str) -> None:
    """A job's `tag` or `batch` label: InputError if too long or holding control characters."""
    if value is None:
        return
    if len(value) > MAX_LABEL_CHARS:
        raise InputError(
            f"{what}_too_long",
            f"{what} is over {MAX_LABEL_CHARS} characters (rule {what}_too_long)",
        )
    for index, char in enumerate(value):
        if unicodedata.category(char) in _LABEL_FORBIDDEN_CATEGORIES:
            raise InputError(
                f"{what}_bad_character",
                f"{what} has a control or bidi character U+{ord(char):04X} at position "
                f"{index + 1} (rule {what}_bad_character)",
            )


def prepare(
    spec: JobSpec, preflight: Preflight | None = None, *, base_dir: Path | None = None
) -> OcrRequest:
    """Read and check one job's inputs against every pre-flight rule; raises InputError
    naming the rule. `preflight`: the rules' configuration (defaults without one)."""
    # model_construct: the documented defaults, without reading the environment.
    rules = preflight or make_preflight(Settings.model_construct())
    return Preparer(rules, base_dir).prepare(spec)


SideKey = int | str | None  # id() of an image's bytes, its URL, or no image


def _side_key(image: ImageInput | None) -> SideKey:
    if image is None:
        return None
    return image.url if image.url is not None else id(image.data)


class Preparer:
    """`prepare` for many jobs at once (a chunk of a manifest, an HTTP batch): a file named
    by several jobs is read once, and jobs made of the same image objects (the same bytes,
    URL or none per side) and portrait flag are checked once, their request shared. What is
    checked is what is stored: the shared request holds the very bytes its check read.

    Holds every image it read (and every request it checked) while it lives: one per chunk.
    """

    def __init__(self, preflight: Preflight, base_dir: Path | None = None) -> None:
        self.preflight = preflight
        self.base_dir = base_dir
        self._files: dict[str | Path, ImageInput] = {}
        # The request holds the images whose id() the key names, so an id is never reused
        # while its entry lives.
        self._checked: dict[
            tuple[SideKey, SideKey, bool], tuple[OcrRequest, tuple[str, str] | None]
        ] = {}

    def _resolve(self, source: Source | None, side: str) -> ImageInput | None:
        if (
            source is None
            or isinstance(source, bytes)
            or (isinstance(source, str) and _is_url(source))
        ):
            return _resolve(source, side, self.base_dir)
        # Only a read that worked is kept: a refusal names the side, so each row gets its own.
        found = self._files.get(source)
        if found is None:
            found = _resolve(source, side, self.base_dir)
            assert found is not None  # a file source always gives bytes (or raises)
            self._files[source] = found
        return found

    def prepare(self, spec: JobSpec) -> OcrRequest:
        """Read and check one job's inputs (`prepare`), or raise its InputError again."""
        check_label(spec.tag, "tag")
        front = self._resolve(spec.front, "front")
        back = self._resolve(spec.back, "back")
        key = (_side_key(front), _side_key(back), spec.portrait)
        entry = self._checked.get(key)
        if entry is None:
            request = OcrRequest(front=front, back=back, portrait=spec.portrait)
            try:
                self.preflight.check(request)
                entry = (request, None)
            except InputError as exc:
                entry = (request, (exc.rule, exc.message))
            self._checked[key] = entry
        request, refused = entry
        if refused is not None:
            raise InputError(*refused)
        return request


def _side_columns(
    session: Session, sealer: Sealer, tenant: str, image: ImageInput | None
) -> tuple[str | None, uuid.UUID | None]:
    if image is None:
        return None, None
    if image.url is not None:
        return image.url, None
    stored = store_image(session, sealer, tenant, image.data or b"")
    session.flush()  # assigns the id, and lets the next identical image find this one
    return None, stored.id


def _add_job(
    session: Session,
    settings: Settings,
    sealer: Sealer,
    request: OcrRequest,
    spec: JobSpec,
    batch: str | None,
    batch_id: uuid.UUID | None = None,
    job_id: uuid.UUID | None = None,
) -> uuid.UUID:
    front_url, front_image_id = _side_columns(session, sealer, settings.tenant, request.front)
    back_url, back_image_id = _side_columns(session, sealer, settings.tenant, request.back)
    job_id = job_id or uuid.uuid4()
    job = Job(
        id=job_id,
        tenant=settings.tenant,
        status=JobStatus.queued,
        front_url=sealer.seal_url(job_id, "front_url", front_url),
        front_image_id=front_image_id,
        back_url=sealer.seal_url(job_id, "back_url", back_url),
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
    job_id: uuid.UUID | None = None,
    before_commit: BeforeCommit | None = None,
    preflight: Preflight | None = None,
    publish: bool = True,
    sealer: Sealer,
) -> uuid.UUID:
    """Validate, commit and publish one job (its URLs and images sealed by `sealer`);
    returns its id (also if the broker is down).
    A `batch` label counts the job into the label's batch row, in the same transaction.
    `job_id`: the id to give it (else a new one); `before_commit` runs in its transaction;
    `preflight`: the rules (from `make_preflight(settings)`; one that checked these images
    already does not decode them again); `publish=False`: the caller publishes the committed
    job and records its `enqueued_at` (the HTTP API, grouping its requests)."""
    check_label(batch, "batch")
    spec = JobSpec(front=front, back=back, portrait=portrait, tag=tag)
    request = prepare(spec, preflight or make_preflight(settings))
    with session_factory() as session:
        batch_id = (
            None if batch is None else batches.count_into_label(session, settings.tenant, batch, 1)
        )
        job_id = _add_job(session, settings, sealer, request, spec, batch, batch_id, job_id)
        if before_commit is not None:
            before_commit(session)
        session.commit()
    if not publish:
        return job_id
    published = _publish(session_factory, publisher, [job_id])
    log.info("job_submitted", job_id=str(job_id), published=published)
    return job_id


def _validate_all(
    specs: Sequence[JobSpec], preflight: Preflight, base_dir: Path | None, chunk_rows: int
) -> None:
    problems: list[RowProblem] = []
    for start, chunk in _chunks(specs, chunk_rows):
        # A chunk's worth of images held at a time, as the store holds them after.
        preparer = Preparer(preflight, base_dir)
        for index, spec in enumerate(chunk, start=start + 1):
            try:
                preparer.prepare(spec)
            except InputError as exc:
                problems.append(RowProblem(spec.line or index, exc.rule, exc.message))
    if problems:
        raise ManifestError(problems)


def _chunks(specs: Sequence[JobSpec], size: int) -> Iterator[tuple[int, Sequence[JobSpec]]]:
    for start in range(0, len(specs), size):
        yield start, specs[start : start + size]


def submit_many(
    session_factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    items: Iterable[JobSpec],
    *,
    batch: str | None = None,
    batch_id: uuid.UUID | None = None,
    job_ids: Sequence[uuid.UUID] | None = None,
    progress: ProgressFn | None = None,
    chunk_rows: int = CHUNK_ROWS,
    max_rows: int = MAX_ROWS,
    base_dir: Path | None = None,
    preflight: Preflight | None = None,
    checked: Sequence[OcrRequest] | None = None,
    sealer: Sealer,
) -> list[uuid.UUID]:
    """All-or-nothing validation of every item (ManifestError lists each bad row), then
    commit in chunks, publishing each chunk after its commit. Ids come back in input order
    (`job_ids`, one per item, when given). `batch_id` names an existing batch row whose
    `total` counts these jobs already; without it, a `batch` label's row is counted up by
    all of them before the first chunk (so it cannot look complete between chunks) and
    down by those not stored if a chunk fails.

    More than `max_rows` items are refused before any is checked (at most max_rows + 1 are
    taken from `items`). With `base_dir`, every file path must lie inside it (symlinks
    resolved). Files are read twice (validate, then store: each distinct file once per chunk
    of rows each time) rather than all held in memory; a file that changes in between fails
    its chunk, and earlier chunks stay submitted.
    `checked`: the items' requests as `prepare` returned them, one per item, when the caller
    validated every item already (the HTTP API, whose images are in memory): not again.
    """
    check_label(batch, "batch")
    specs = list(itertools.islice(items, max_rows + 1))
    if len(specs) > max_rows:
        raise too_many_rows(max_rows)
    if job_ids is not None and len(job_ids) != len(specs):
        raise ValueError("job_ids must give one id per item")
    if checked is not None and len(checked) != len(specs):
        raise ValueError("checked must give one request per item")
    preflight = preflight or make_preflight(settings)
    if checked is None:
        _validate_all(specs, preflight, base_dir, chunk_rows)
    counted: uuid.UUID | None = None
    if batch is not None and batch_id is None and specs:
        with session_factory() as session:
            counted = batch_id = batches.count_into_label(
                session, settings.tenant, batch, len(specs)
            )
            session.commit()
    ids: list[uuid.UUID] = []
    unpublished = 0
    try:
        for start, chunk in _chunks(specs, chunk_rows):
            preparer = Preparer(preflight, base_dir)
            requests = (
                [preparer.prepare(spec) for spec in chunk]
                if checked is None
                else checked[start : start + len(chunk)]
            )
            given = None if job_ids is None else job_ids[start : start + len(chunk)]
            with session_factory() as session:
                chunk_ids = _insert_chunk(
                    session, sealer, settings.tenant, requests, chunk, batch, batch_id, given
                )
                session.commit()
            if not _publish(session_factory, publisher, chunk_ids):
                unpublished += len(chunk_ids)
            ids.extend(chunk_ids)
            if progress is not None:
                progress(len(ids), len(specs))
    except BaseException:
        if counted is not None:
            _uncount(session_factory, counted, len(specs) - len(ids))
        raise
    log.info("jobs_submitted", jobs=len(ids), unpublished=unpublished)
    return ids


def _uncount(session_factory: sessionmaker[Session], batch_id: uuid.UUID, jobs: int) -> None:
    """Best effort (the error that stopped the chunks is the one to raise): a total left too
    high keeps the label's batch from completing, never makes it complete early."""
    try:
        with session_factory() as session:
            batches.uncount(session, batch_id, jobs)
            session.commit()
    except Exception as exc:
        log.warning("batch_uncount_failed", batch_id=str(batch_id), error_type=type(exc).__name__)


ImageKey = tuple[str, int]  # (keyed digest, size): how the image table finds a tenant's duplicate


def chunk_images(
    session: Session, sealer: Sealer, tenant: str, requests: Sequence[OcrRequest]
) -> dict[int, uuid.UUID]:
    """The image id of every uploaded side of the chunk, by `id()` of its bytes: found (one
    query) or inserted (one multi-row INSERT). The same bytes twice are stored once, as
    `store_image` does."""
    wanted: dict[ImageKey, bytes] = {}
    key_of: dict[int, ImageKey] = {}
    for request in requests:
        for side in (request.front, request.back):
            # Jobs that share an image object (Preparer) share its digest: one HMAC.
            if side is not None and side.data is not None and id(side.data) not in key_of:
                key = key_of[id(side.data)] = (sealer.image_digest(side.data), len(side.data))
                wanted.setdefault(key, side.data)
    if not wanted:
        return {}
    ids: dict[ImageKey, uuid.UUID] = {}
    found = session.execute(
        select(IMAGE_TABLE.c.id, IMAGE_TABLE.c.digest, IMAGE_TABLE.c.size_bytes)
        .where(
            IMAGE_TABLE.c.tenant == tenant,
            IMAGE_TABLE.c.digest.in_(sorted({digest for digest, _ in wanted})),
        )
        # Held until the chunk commits: a retention or erasure deleting one of these images
        # waits for our jobs and then keeps it (worker.store.retention).
        .with_for_update(key_share=True)
    )
    for row in found:
        ids.setdefault((row.digest, row.size_bytes), row.id)
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
                "digest": key[0],
                "content_type": CONTENT_TYPES[kind],
                "size_bytes": key[1],
                "data": sealer.seal_image(ids[key], data),
                "created_at": now,
            }
        )
    if rows:
        session.execute(insert(IMAGE_TABLE), rows)
    return {data_id: ids[key] for data_id, key in key_of.items()}


def _insert_chunk(
    session: Session,
    sealer: Sealer,
    tenant: str,
    requests: Sequence[OcrRequest],
    specs: Sequence[JobSpec],
    batch: str | None,
    batch_id: uuid.UUID | None = None,
    job_ids: Sequence[uuid.UUID] | None = None,
) -> list[uuid.UUID]:
    """The chunk's images and jobs as multi-row INSERTs (not committed); ids in order."""
    images = chunk_images(session, sealer, tenant, requests)
    now = utcnow()
    ids = list(job_ids) if job_ids is not None else [uuid.uuid4() for _ in specs]
    rows = [
        job_row(sealer, tenant, job_id, request, images, spec.tag, batch, batch_id, now)
        for job_id, request, spec in zip(ids, requests, specs, strict=True)
    ]
    # One statement: SQLAlchemy sends an executemany of one INSERT as multi-row VALUES.
    session.execute(insert(JOB_TABLE), rows)
    return ids


def job_row(
    sealer: Sealer,
    tenant: str,
    job_id: uuid.UUID,
    request: OcrRequest,
    images: dict[int, uuid.UUID],
    tag: str | None,
    batch: str | None,
    batch_id: uuid.UUID | None,
    now: datetime,
) -> dict[str, Any]:
    """A new job's row for a multi-row INSERT (its URLs sealed); `images`: from
    `chunk_images`."""

    def side(image: ImageInput | None) -> tuple[str | None, uuid.UUID | None]:
        if image is None:
            return None, None
        if image.url is not None:
            return image.url, None
        return None, images[id(image.data)]

    front_url, front_image_id = side(request.front)
    back_url, back_image_id = side(request.back)
    return {
        "id": job_id,
        "tenant": tenant,
        "status": JobStatus.queued,
        "front_url": sealer.seal_url(job_id, "front_url", front_url),
        "front_image_id": front_image_id,
        "back_url": sealer.seal_url(job_id, "back_url", back_url),
        "back_image_id": back_image_id,
        "portrait": request.portrait,
        "tag": tag,
        "batch": batch,
        "batch_id": batch_id,
        "attempts": 0,
        "api_calls": 0,
        "created_at": now,
    }


def too_many_rows(max_rows: int) -> InputError:
    """The row cap's refusal (nothing submitted)."""
    return InputError(
        "too_many_rows",
        f"more than {max_rows} rows; nothing submitted: split the manifest or raise "
        "--max-rows (rule too_many_rows)",
    )


def read_manifest(path: Path, *, portrait: bool = False, max_rows: int = MAX_ROWS) -> list[JobSpec]:
    """Rows of a CSV with columns front, back, tag (a header line), read as a stream: past
    `max_rows` rows it stops and refuses. Relative file paths are resolved against the CSV's
    folder; URLs are kept as they are."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise InputError(
            "file_not_found", f"manifest file not found: {path} (rule file_not_found)"
        ) from None
    except OSError as exc:
        raise InputError(
            "file_unreadable",
            f"manifest cannot be read: {path}: {exc.strerror} (rule file_unreadable)",
        ) from None
    with handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise InputError(
                "not_a_regular_file",
                f"manifest {path} is not a regular file (rule not_a_regular_file)",
            )
        try:
            return _read_rows(handle, path, portrait=portrait, max_rows=max_rows)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(
                "file_unreadable", f"manifest cannot be read: {path}: {exc} (rule file_unreadable)"
            ) from None


def _read_rows(
    handle: Iterable[str], path: Path, *, portrait: bool, max_rows: int
) -> list[JobSpec]:
    reader = csv.DictReader(handle)
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
        if len(specs) >= max_rows:
            raise too_many_rows(max_rows)
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
