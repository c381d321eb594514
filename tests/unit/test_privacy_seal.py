"""The seal module: every personal column sealed for its row and column, opened back typed;
the keyed image digest and ID-number hash; and the settings that refuse to start without keys."""

from __future__ import annotations

import base64
import uuid
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from models import Result
from worker.errors import ConfigError
from worker.privacy.crypto import DecryptError, KeyRing, generate_entry, key_id_of
from worker.privacy.fields import RESULT_PERSONAL_COLUMNS
from worker.privacy.lookup import key_fingerprint
from worker.privacy.seal import Sealer
from worker.settings import MISSING_KEYS, Settings, load_settings
from worker.tencent.types import OcrResult

JOB = uuid.UUID("00000000-0000-0000-0000-00000000000a")
OTHER = uuid.UUID("00000000-0000-0000-0000-00000000000b")
LOOKUP = bytes(range(32))
CARD = OcrResult(
    request_id="req",
    cn_last_name="陳",
    en_last_name="CHAN",
    last_name_code="7115",
    cn_first_name="大文",
    en_first_name="TAI MAN",
    first_name_code="1129 2429",
    id_number="1234567(8)",
    birthday=date(1990, 2, 3),
    sex="M",
    first_issue_date=date(2008, 1, 2),
    current_issue_date=date(2018, 3, 4),
    validity_period=date(2028, 3, 4),
    validity_period_text="04-03-2028",
    symbol="ASM",
    height_m=Decimal("1.64"),
    unreadable=("birthday",),
)


def _sealer(ring: str | None = None) -> Sealer:
    return Sealer(KeyRing.parse(ring or generate_entry("k1")), LOOKUP)


def _row(sealer: Sealer, job_id: uuid.UUID = JOB) -> Result:
    values = {c: getattr(CARD, c) for c in RESULT_PERSONAL_COLUMNS}
    return Result(
        job_id=job_id,
        request_id="req",
        sex="M",
        unreadable_fields="birthday",
        warning_service_disabled=False,
        **sealer.seal_result(job_id, values),
    )


def test_every_personal_column_is_sealed_and_opens_back_typed() -> None:
    sealer = _sealer()
    row = _row(sealer)
    for column in RESULT_PERSONAL_COLUMNS:
        blob = getattr(row, column)
        assert isinstance(blob, bytes) and key_id_of(blob) == "k1", column
        plain = str(getattr(CARD, column)).encode()
        assert plain not in blob, column
    opened = sealer.open_result(row)
    for column in RESULT_PERSONAL_COLUMNS:
        assert getattr(opened, column) == getattr(CARD, column), column
    assert opened.unreadable == ("birthday",) and opened.sex == "M"


def test_the_lookup_hash_is_written_with_the_result_only_with_a_lookup_key() -> None:
    sealer = _sealer()
    sealed = sealer.seal_result(JOB, {"id_number": "1234567(8)"})
    assert sealed["id_number_hash"] == sealer.lookup_hash(" 1234567(8) ")
    # The lookup key's fingerprint, then the HMAC: rotation tells which key made a hash.
    assert len(sealed["id_number_hash"]) == 36
    assert sealed["id_number_hash"][:4] == key_fingerprint(LOOKUP)
    keyless = Sealer(KeyRing.parse(generate_entry("k1")))
    assert keyless.seal_result(JOB, {"id_number": "1234567(8)"})["id_number_hash"] is None


def test_a_value_moved_to_another_row_or_column_does_not_open() -> None:
    sealer = _sealer()
    row = _row(sealer)
    with pytest.raises(DecryptError):
        sealer.open_result(_moved(row, OTHER))
    url = sealer.seal_url(JOB, "front_url", "https://x.example/a.jpg?token=t")
    assert sealer.open_url(JOB, "front_url", url) == "https://x.example/a.jpg?token=t"
    with pytest.raises(DecryptError) as info:
        sealer.open_url(JOB, "back_url", url)
    assert "token" not in str(info.value)


def _moved(row: Result, job_id: uuid.UUID) -> Result:
    moved = Result(job_id=job_id, request_id=row.request_id)
    for column in RESULT_PERSONAL_COLUMNS:
        setattr(moved, column, getattr(row, column))
    return moved


def test_images_portraits_and_kept_answers_round_trip() -> None:
    sealer = _sealer()
    data = b"\xff\xd8\xff" + bytes(range(256)) * 4
    blob = sealer.seal_image(JOB, data)
    assert data[3:64] not in blob and sealer.open_image(JOB, blob) == data
    assert sealer.open_portrait(JOB, sealer.seal_portrait(JOB, data) or b"") == data
    assert sealer.open_answer(JOB, sealer.seal_answer(JOB, '{"ID":"1"}')) == '{"ID":"1"}'


def test_the_image_digest_is_keyed_and_follows_the_current_key() -> None:
    import hashlib

    first = generate_entry("k1")
    second = generate_entry("k2")
    data = b"card bytes"
    old = _sealer(first)
    assert old.image_digest(data) == _sealer(first).image_digest(data)
    assert old.image_digest(data) != hashlib.sha256(data).hexdigest()
    rotated = _sealer(f"{second},{first}")
    assert rotated.image_digest(data) != old.image_digest(data)
    # The old key still opens what it sealed once the new one leads the ring.
    assert rotated.open_image(JOB, old.seal_image(JOB, data)) == data


def test_settings_refuse_without_keys_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MACAO_OCR_DATA_KEYS", raising=False)
    monkeypatch.delenv("MACAO_OCR_DATA_KEYS_FILE", raising=False)
    with pytest.raises(ConfigError) as info:
        Sealer.from_settings(load_settings())
    message = info.value.message
    assert message == MISSING_KEYS and "\n" not in message
    for name in ("MACAO_OCR_DATA_KEYS", "MACAO_OCR_DATA_KEYS_FILE", "macao-ocr keys generate"):
        assert name in message


def test_the_ring_comes_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MACAO_OCR_DATA_KEYS", raising=False)
    path = tmp_path / "ring"
    path.write_text(generate_entry("filekey") + "\n" + generate_entry("older") + "\n")
    sealer = Sealer.from_settings(Settings(data_keys_file=str(path)))
    assert sealer.ring.key_ids == ("filekey", "older")
    with pytest.raises(ConfigError) as info:
        Sealer.from_settings(Settings(data_keys_file=str(tmp_path / "missing")))
    assert "MACAO_OCR_DATA_KEYS_FILE" in info.value.message


def test_a_bad_key_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = base64.b64encode(b"x" * 16).decode()
    monkeypatch.setenv("MACAO_OCR_DATA_KEYS", f"k1:{secret}")
    with pytest.raises(ConfigError) as info:
        Sealer.from_settings(load_settings())
    assert secret not in str(info.value) and "32" in str(info.value)
    monkeypatch.setenv("MACAO_OCR_LOOKUP_KEY", secret)
    with pytest.raises(ConfigError) as lookup:
        load_settings()
    assert "MACAO_OCR_LOOKUP_KEY" in str(lookup.value) and secret not in str(lookup.value)
    # In a list of lookup keys the bad one is named by its place, still never echoed.
    monkeypatch.setenv("MACAO_OCR_LOOKUP_KEY", f"{base64.b64encode(LOOKUP).decode()},{secret}")
    with pytest.raises(ConfigError) as listed:
        load_settings()
    assert "key 2" in str(listed.value) and secret not in str(listed.value)


def test_without_a_lookup_key_lookup_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MACAO_OCR_LOOKUP_KEY", raising=False)
    settings = load_settings()
    assert settings.lookup_key_bytes() is None
    assert Sealer.from_settings(settings).lookup_key is None


def test_reprs_never_show_keys() -> None:
    entry = generate_entry("k1")
    sealer = Sealer.from_settings(Settings(data_keys=entry, lookup_key=base64.b64encode(LOOKUP)))
    assert entry.split(":")[1] not in repr(sealer)
    settings = Settings(data_keys=entry)
    assert entry.split(":")[1] not in repr(settings)


def test_keys_generate_prints_one_entry_and_nothing_else() -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    result = CliRunner().invoke(app, ["keys", "generate", "--id", "k2027"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and KeyRing.parse(lines[0]).current_id == "k2027"
    other = CliRunner().invoke(app, ["keys", "generate"])
    assert other.stdout != result.stdout


def test_a_request_digest_is_keyed_fits_its_column_and_survives_a_rotation() -> None:
    old_entry = generate_entry("old")
    before = Sealer(KeyRing.parse(old_entry))
    digest = before.request_digest(b'["job",{}]')
    assert digest.startswith("old:") and len(digest) <= 64
    assert before.request_digest_matches(digest, b'["job",{}]')
    assert not before.request_digest_matches(digest, b'["job",{"tag":"x"}]')
    # A new key first in the ring: new digests under it, old ones compared under theirs.
    after = Sealer(KeyRing.parse(f"{generate_entry('n' * 32)},{old_entry}"))
    assert after.request_digest(b'["job",{}]').startswith("n" * 32 + ":")
    assert len(after.request_digest(b'["job",{}]')) <= 64
    assert after.request_digest_matches(digest, b'["job",{}]')
    # Once the old key has left the ring, its digests match nothing.
    assert not Sealer(KeyRing.parse(generate_entry("n"))).request_digest_matches(
        digest, b'["job",{}]'
    )
