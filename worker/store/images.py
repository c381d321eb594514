"""Uploaded images live in the `image` table, so any worker on any host reads them by reference."""

from __future__ import annotations

import uuid

from sqlalchemy import Table, select
from sqlalchemy.orm import Session, defer

from models import Image, Job
from worker.errors import InputError, NotFoundError
from worker.privacy.seal import Sealer
from worker.tencent.types import ImageInput, OcrRequest
from worker.tencent.validation import sniff_image_type

IMAGE: Table = Image.__table__  # type: ignore[assignment]
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


def store_image(session: Session, sealer: Sealer, tenant: str, data: bytes) -> Image:
    """Add the image, sealed (or return the tenant's identical one already stored, found by
    its keyed digest); not committed."""
    kind = sniff_image_type(data)
    if kind is None:
        raise InputError("not_png_or_jpeg", "image is neither PNG nor JPEG (rule not_png_or_jpeg)")
    digest = sealer.image_digest(data)
    # FOR KEY SHARE: a retention or erasure deleting this image waits for our job to commit
    # (and then keeps the image), or we wait for its commit and find the row gone
    # (worker.store.retention).
    existing = session.scalars(
        select(Image)
        .where(Image.tenant == tenant, Image.digest == digest, Image.size_bytes == len(data))
        # Its id is what the caller wants: not the bytes it already holds (read if touched).
        .options(defer(Image.data))
        .limit(1)
        .with_for_update(key_share=True)
    ).first()
    if existing is not None:
        return existing
    image_id = uuid.uuid4()
    image = Image(
        id=image_id,
        tenant=tenant,
        digest=digest,
        content_type=CONTENT_TYPES[kind],
        size_bytes=len(data),
        data=sealer.seal_image(image_id, data),
    )
    session.add(image)
    return image


def side_input(url: str | None, image_id: object, data: bytes | None) -> ImageInput | None:
    """One side of a request from a job's URL or stored image (`data`: that image's bytes,
    None if the row is gone: NotFoundError)."""
    if url is not None:
        return ImageInput(url=url)
    if image_id is None:
        return None
    if data is None:
        raise NotFoundError("the job's stored image is missing", code="ImageMissing")
    return ImageInput(data=data)


def _side(
    session: Session, sealer: Sealer, job: Job, column: str, image_id: object
) -> ImageInput | None:
    url = sealer.open_url(job.id, column, getattr(job, column))
    data = None
    if url is None and image_id is not None:
        blob = session.execute(select(IMAGE.c.data).where(IMAGE.c.id == image_id)).scalar()
        data = sealer.open_image(image_id, blob)
    return side_input(url, image_id, data)


def load_request(session: Session, sealer: Sealer, job: Job) -> OcrRequest:
    """Rebuild the job's OcrRequest from its URLs or stored image bytes (opened)."""
    return OcrRequest(
        front=_side(session, sealer, job, "front_url", job.front_image_id),
        back=_side(session, sealer, job, "back_url", job.back_image_id),
        portrait=job.portrait,
    )
