"""The columns that hold personal data: one list shared by encryption, retention and erasure.

Everything else (statuses, codes, warnings, timestamps, tags, counts, decisions) stays plain
so operations keep working without keys."""

from __future__ import annotations

from typing import Final

# The result's personal fields: names and their codes, ID number, dates, symbol, height.
RESULT_PERSONAL_COLUMNS: Final = (
    "cn_last_name",
    "en_last_name",
    "last_name_code",
    "cn_first_name",
    "en_first_name",
    "first_name_code",
    "id_number",
    "birthday",
    "first_issue_date",
    "current_issue_date",
    "validity_period",
    "validity_period_text",
    "symbol",
    "height_m",
)

# Image URLs may carry tokens and passwords in their query, and point at a person's card.
JOB_PERSONAL_COLUMNS: Final = ("front_url", "back_url")

# Whole rows that are personal data: card images, portraits, answers kept for replay.
PERSONAL_BLOB_COLUMNS: Final = (
    ("image", "data"),
    ("portrait", "data"),
    ("kept_answer", "response_json"),
)

# Keyed hashes that find a person's jobs without decrypting (worker/privacy/lookup.py):
# personal data too, so retention and erasure clear them with the fields above.
RESULT_LOOKUP_COLUMNS: Final[tuple[str, ...]] = ("id_number_hash",)
