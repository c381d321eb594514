"""CardFacts from what the checks can be given: the API's answer or a stored result row."""

from __future__ import annotations

from typing import Any, Protocol

from worker.decision.checks import CardFacts


class _Fields(Protocol):
    """An OcrResult or a models.Result: both carry every field CardFacts reads."""

    @property
    def id_number(self) -> str | None: ...


def card_facts(
    result: _Fields, *, unreadable: tuple[str, ...] | str | None, sides_identical: bool
) -> CardFacts:
    """The checks' view of a result; `unreadable` as a tuple or as stored (comma-separated)."""
    if isinstance(unreadable, str):
        unreadable = tuple(n for n in unreadable.split(",") if n)
    r: Any = result
    return CardFacts(
        r.id_number,
        r.cn_last_name,
        r.en_last_name,
        r.cn_first_name,
        r.en_first_name,
        r.birthday,
        r.sex,
        r.first_issue_date,
        r.current_issue_date,
        r.validity_period,
        r.validity_period_text,
        r.symbol,
        r.resident_type,
        unreadable or (),
        sides_identical,
    )


def same_image(
    front_url: str | None, front_image_id: object, back_url: str | None, back_image_id: object
) -> bool:
    """Both sides sent, and they are one image: the same URL, or the same stored image (the
    producer stores a tenant's identical bytes once, so equal bytes share one image id)."""
    if front_url is not None and front_url == back_url:
        return True
    return front_image_id is not None and front_image_id == back_image_id
