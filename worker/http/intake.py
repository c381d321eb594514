"""From an HTTP body to the producer's JobSpec, and the digest an Idempotency-Key is bound to.

A URL must carry a scheme: the producer reads a string without `://` as a file path, and a
caller must never make the server read its own files."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from worker.errors import InputError
from worker.http.schemas import ImageRef, JobRequest
from worker.privacy.seal import Sealer
from worker.producer import JobSpec, Preparer, Source
from worker.tencent.types import OcrRequest

MULTIPART_BOOL = {"true": True, "1": True, "false": False, "0": False, "": False}


def _source(ref: ImageRef | None, side: str, decoded: dict[str, bytes] | None) -> Source | None:
    if ref is None:
        return None
    if (ref.url is None) == (ref.base64 is None):
        raise InputError(
            "image_source", f"{side} needs exactly one of url or base64 (rule image_source)"
        )
    if ref.url is not None:
        if "://" not in ref.url:
            raise InputError("bad_url", f"{side} image URL must be http(s) (rule bad_url)")
        return ref.url
    text = ref.base64 or ""
    if decoded is not None and text in decoded:
        return decoded[text]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            "bad_base64", f"{side} image is not valid base64 (rule bad_base64)"
        ) from None
    if decoded is not None:
        decoded[text] = data
    return data


def spec_from_json(body: JobRequest, decoded: dict[str, bytes] | None = None) -> JobSpec:
    """The job a JSON body asks for (InputError if an image reference is malformed).
    `decoded`: base64 texts decoded already (a batch's jobs that repeat an image share one
    bytes object, decoded once), added to."""
    return JobSpec(
        front=_source(body.front, "front", decoded),
        back=_source(body.back, "back", decoded),
        portrait=body.portrait,
        tag=body.tag,
    )


def spec_from_form(
    front: bytes | None, back: bytes | None, fields: dict[str, str]
) -> tuple[JobSpec, str | None]:
    """The job a multipart form asks for, and its batch label."""
    unknown = sorted(set(fields) - {"portrait", "tag", "batch"})
    if unknown:
        raise InputError(
            "form_fields", f"unknown form fields: {', '.join(unknown)} (rule form_fields)"
        )
    flag = fields.get("portrait", "false").strip().lower()
    if flag not in MULTIPART_BOOL:
        raise InputError("form_fields", "portrait must be true or false (rule form_fields)")
    spec = JobSpec(
        front=front, back=back, portrait=MULTIPART_BOOL[flag], tag=fields.get("tag") or None
    )
    return spec, fields.get("batch") or None


def validate(spec: JobSpec, preparer: Preparer) -> OcrRequest:
    """The CLI's pre-flight checks (worker.producer.prepare, with the deployment's rules:
    `Preparer(make_preflight(settings))`): InputError names the rule; the request checked.
    One preparer for a batch's jobs checks jobs of the same images once."""
    if spec.front is None and spec.back is None:
        raise InputError("no_image", "give a front and/or a back image (rule no_image)")
    return preparer.prepare(spec)


def _side(source: Source | None, hashed: dict[int, str] | None) -> Any:
    if source is None:
        return None
    if isinstance(source, bytes):
        if hashed is None:
            return {"sha256": hashlib.sha256(source).hexdigest()}
        found = hashed.get(id(source))
        if found is None:
            found = hashed[id(source)] = hashlib.sha256(source).hexdigest()
        return {"sha256": found}
    return {"url": str(source)}


def spec_digest(
    spec: JobSpec, batch: str | None, hashed: dict[int, str] | None = None
) -> dict[str, Any]:
    """What identifies a job request: the same image sent as base64 or as a file is one.
    `hashed`: digests by id() of image bytes that the caller holds while it lives (a batch's
    jobs sharing one bytes object hash it once), added to."""
    return {
        "front": _side(spec.front, hashed),
        "back": _side(spec.back, hashed),
        "portrait": spec.portrait,
        "tag": spec.tag,
        "batch": batch,
    }


def request_text(kind: str, content: Any) -> bytes:
    """An endpoint name and a canonical JSON of its normalised request."""
    return json.dumps([kind, content], sort_keys=True, separators=(",", ":")).encode("utf-8")


def request_sha256(kind: str, content: Any) -> str:
    """The unkeyed SHA-256 that releases before keyed digests stored (matched for their 24 h)."""
    return hashlib.sha256(request_text(kind, content)).hexdigest()


@dataclass(frozen=True)
class RequestDigest:
    """What an Idempotency-Key is bound to: `value` is stored (`Sealer.request_digest`, keyed
    under the current data key); `matches` compares a stored one under its own key."""

    value: str
    text: bytes
    sealer: Sealer

    def matches(self, stored: str) -> bool:
        """Whether a stored digest was made of this same request."""
        if ":" not in stored:  # an unkeyed SHA-256 from before keyed digests
            return hmac.compare_digest(stored, hashlib.sha256(self.text).hexdigest())
        return self.sealer.request_digest_matches(stored, self.text)


def request_digest(sealer: Sealer, kind: str, content: Any) -> RequestDigest:
    """The keyed digest of an endpoint's normalised request."""
    text = request_text(kind, content)
    return RequestDigest(sealer.request_digest(text), text, sealer)
