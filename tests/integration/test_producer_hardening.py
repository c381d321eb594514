"""Producer hardening: only regular files, sized before read; manifest row cap and base
directory; labels without control or bidi characters; refused URLs store nothing."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy.orm import Session, sessionmaker

from models import Image, Job
from tests.fixtures.workers import sealer_for_tests
from worker.broker.publish import RecordingPublisher
from worker.errors import InputError
from worker.producer import (
    MAX_FILE_BYTES,
    JobSpec,
    ManifestError,
    read_image_file,
    read_manifest,
    submit,
    submit_many,
)
from worker.settings import Settings


def card() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (240, 200), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def settings() -> Settings:
    return Settings(tenant="hardening", url_resolve_timeout_s=0.5)


def count(session: Session, model: type[object]) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


def test_dev_zero_is_refused_without_reading() -> None:
    with pytest.raises(InputError) as info:
        read_image_file(Path("/dev/zero"), "front")
    assert info.value.rule == "not_a_regular_file"


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "card.jpg"
    os.mkfifo(fifo)
    with pytest.raises(InputError) as info:
        read_image_file(fifo, "front")  # no writer: a blocking open would hang here
    assert info.value.rule == "not_a_regular_file"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        read_image_file(tmp_path, "back")
    assert info.value.rule == "not_a_regular_file" and "back" in info.value.message


def test_a_100_mb_file_is_refused_without_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.jpg"
    with big.open("wb") as handle:  # sparse: 100 MB on paper, nothing on disk
        handle.write(b"\xff\xd8\xff")
        handle.truncate(100 * 1024 * 1024)
    reads: list[int] = []
    real_fdopen = os.fdopen

    def spy(fd: int, *args: object, **kwargs: object) -> object:
        reads.append(fd)
        return real_fdopen(fd, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "fdopen", spy)
    with pytest.raises(InputError) as info:
        read_image_file(big, "front")
    assert info.value.rule == "image_too_large"
    assert reads == []  # refused from fstat alone
    assert str(100 * 1024 * 1024) in info.value.message
    assert MAX_FILE_BYTES < 100 * 1024 * 1024


def _fstat_reporting(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """fstat tells `size` bytes: the file grew after it, as far as the read can tell."""
    real = os.fstat

    def smaller(fd: int) -> os.stat_result:
        info = list(real(fd))
        info[6] = size  # st_size
        return os.stat_result(info)

    monkeypatch.setattr(os, "fstat", smaller)


def test_a_file_that_grew_after_fstat_is_read_whole_or_refused_over_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grown = tmp_path / "grown.jpg"
    grown.write_bytes(card())
    _fstat_reporting(monkeypatch, 10)
    assert read_image_file(grown, "front") == grown.read_bytes()
    big = tmp_path / "big.jpg"
    with big.open("wb") as handle:  # sparse
        handle.write(b"\xff\xd8\xff")
        handle.truncate(MAX_FILE_BYTES + 10)
    with pytest.raises(InputError) as info:
        read_image_file(big, "front")
    assert info.value.rule == "image_too_large"
    assert str(MAX_FILE_BYTES + 1) in info.value.message  # what was read: one byte over


def test_manifest_row_cap_refuses_before_reading_everything(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    with manifest.open("w") as handle:
        handle.write("front,tag\n")
        for n in range(50):
            handle.write(f"https://cards.example.com/{n}.jpg,t{n}\n")
        handle.write('"unterminated\n')  # past the cap: never reached
    with pytest.raises(InputError) as info:
        read_manifest(manifest, max_rows=10)
    assert info.value.rule == "too_many_rows"
    assert "10" in info.value.message and "--max-rows" in info.value.message


def test_submit_many_row_cap_takes_no_more_than_it_needs(
    session_factory: sessionmaker[Session], db_session: Session, settings: Settings
) -> None:
    taken = 0

    def specs():  # type: ignore[no-untyped-def]
        nonlocal taken
        while True:
            taken += 1
            yield JobSpec(front=card())

    with pytest.raises(InputError) as info:
        submit_many(
            session_factory,
            RecordingPublisher(),
            settings,
            specs(),
            max_rows=5,
            sealer=sealer_for_tests(),
        )
    assert info.value.rule == "too_many_rows"
    assert taken == 6
    assert count(db_session, Job) == 0


def test_base_dir_keeps_paths_inside(
    session_factory: sessionmaker[Session], db_session: Session, settings: Settings, tmp_path: Path
) -> None:
    base = tmp_path / "cards"
    base.mkdir()
    (base / "ok.jpg").write_bytes(card())
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(card())
    (base / "link.jpg").symlink_to(outside)
    manifest = base / "m.csv"
    manifest.write_text("front\nok.jpg\n../../etc/shadow\n/etc/passwd\nlink.jpg\n../secret.jpg\n")
    specs = read_manifest(manifest)
    publisher = RecordingPublisher()
    with pytest.raises(ManifestError) as info:
        submit_many(
            session_factory, publisher, settings, specs, base_dir=base, sealer=sealer_for_tests()
        )
    assert [(p.line, p.rule) for p in info.value.problems] == [
        (3, "outside_base_dir"),
        (4, "outside_base_dir"),
        (5, "outside_base_dir"),
        (6, "outside_base_dir"),
    ]
    assert publisher.published == [] and count(db_session, Job) == 0
    ids = submit_many(
        session_factory, publisher, settings, specs[:1], base_dir=base, sealer=sealer_for_tests()
    )
    assert len(ids) == 1


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.csv"
    manifest.write_text("front\ncard.jpg\n")
    assert read_manifest(manifest)[0].front == tmp_path / "sub" / "card.jpg"


@pytest.mark.parametrize(
    "tag", ["abc\u202edcba", "x\u2066y", "line\nbreak", "nul\x00", "zw\u200bj", "a\u2028b"]
)
def test_tags_refuse_control_and_bidi_characters(
    session_factory: sessionmaker[Session], db_session: Session, settings: Settings, tag: str
) -> None:
    with pytest.raises(InputError) as info:
        submit(
            session_factory,
            RecordingPublisher(),
            settings,
            card(),
            tag=tag,
            sealer=sealer_for_tests(),
        )
    assert info.value.rule == "tag_bad_character"
    assert "U+" in info.value.message
    assert count(db_session, Job) == 0


def test_a_plain_unicode_tag_is_fine(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    submit(
        session_factory,
        RecordingPublisher(),
        settings,
        card(),
        tag="客戶 42 - José",
        sealer=sealer_for_tests(),
    )


BAD_URLS = [
    ("http://169.254.169.254/latest/meta-data", "metadata_address"),
    ("http://127.0.0.1:6379/", "loopback_address"),
    ("http://10.0.0.5/", "private_address"),
    ("http://0x7f000001/", "loopback_address"),
    ("http://2130706433/", "loopback_address"),
    ("https://cards.example.com/" + "x" * 5000, "url_too_long"),
    ("http://user:pw@cards.example.com/a.jpg", "url_credentials"),
    ("http://localhost/a.jpg", "loopback_address"),
]


@pytest.mark.parametrize(("url", "rule"), BAD_URLS, ids=[r for _, r in BAD_URLS])
def test_refused_urls_store_and_publish_nothing(
    session_factory: sessionmaker[Session],
    db_session: Session,
    settings: Settings,
    url: str,
    rule: str,
) -> None:
    publisher = RecordingPublisher()
    with pytest.raises(InputError) as info:
        submit(session_factory, publisher, settings, url, sealer=sealer_for_tests())
    assert info.value.rule == rule
    assert publisher.published == []
    assert count(db_session, Job) == 0 and count(db_session, Image) == 0


def test_back_without_front_is_refused(
    session_factory: sessionmaker[Session], db_session: Session, settings: Settings
) -> None:
    publisher = RecordingPublisher()
    with pytest.raises(InputError) as info:
        submit(session_factory, publisher, settings, None, card(), sealer=sealer_for_tests())
    assert info.value.rule == "no_front"
    assert publisher.published == [] and count(db_session, Job) == 0


def test_cli_max_rows_and_no_front_are_refused_before_the_database(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    manifest = tmp_path / "m.csv"
    manifest.write_text("front\n" + "".join(f"https://e.com/{n}.jpg\n" for n in range(3)))
    # An unreachable database: the refusals must come first.
    env = {"MACAO_OCR_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    runner = CliRunner()
    result = runner.invoke(app, ["submit", "--manifest", str(manifest), "--max-rows", "2"], env=env)
    assert result.exit_code == 2
    assert "too_many_rows" in result.output and "--max-rows" in result.output
    result = runner.invoke(app, ["submit", "--back", str(manifest)], env=env)
    assert result.exit_code != 0 and "no_front" in result.output
