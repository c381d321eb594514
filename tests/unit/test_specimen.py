"""Specimen cards: realistic fields, deterministic bytes, warnings that show, cheap answer key."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image, ImageFilter, ImageStat

from emulator.specimen import (
    MAX_JPEG_BYTES,
    NO_EXPIRY_TEXT,
    NON_PERMANENT,
    PERMANENT,
    PORTRAIT_BOX,
    make_specimen,
    read_embedded,
)

RESPONSE_FIELDS = {
    "CnLastName",
    "EnLastName",
    "LastNameCode",
    "CnFirstName",
    "EnFirstName",
    "FirstNameCode",
    "ID",
    "Birthday",
    "Sex",
    "FirstIssueDate",
    "CurrentIssueDate",
    "ValidityPeriod",
    "Symbol",
    "Height",
    "RetImage",
    "Angle",
    "ResidentType",
    "WarnCardInfos",
}


def dmy(text: str) -> datetime:
    return datetime.strptime(text, "%d-%m-%Y")


def pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize("seed", range(12))
def test_fields_follow_the_api_and_the_card(seed: int) -> None:
    truth = make_specimen(seed).truth
    assert set(truth) == RESPONSE_FIELDS
    assert re.fullmatch(r"[157]\d{6}\(\d\)", truth["ID"])
    birthday, first, current = (
        dmy(truth[k]) for k in ("Birthday", "FirstIssueDate", "CurrentIssueDate")
    )
    assert birthday < first <= current
    validity = dmy(truth["ValidityPeriod"])
    assert (validity.year - current.year, validity.month) == (10, current.month)
    assert 18 <= (current - birthday).days / 365.25 < 61
    assert re.fullmatch(r"[12]\.\d\d", truth["Height"])
    assert truth["Sex"] in {"M", "F"}
    assert re.fullmatch(r"[ABCDN]S?[MF]", truth["Symbol"]) and truth["Symbol"][-1] == truth["Sex"]
    assert truth["ResidentType"] == PERMANENT
    assert truth["WarnCardInfos"] == []
    assert truth["RetImage"] == "" and truth["Angle"] is None
    assert truth["CnLastName"] and re.fullmatch(r"\d{4}", truth["LastNameCode"])
    groups = truth["FirstNameCode"].split(" ")
    assert len(groups) == len(truth["CnFirstName"]) and all(
        re.fullmatch(r"\d{4}", g) for g in groups
    )
    assert truth["EnLastName"].isupper()


def test_same_seed_same_bytes_other_seed_other_person() -> None:
    a, b, c = make_specimen(7), make_specimen(7), make_specimen(8)
    assert a.image == b.image and a.truth == b.truth and a.portrait == b.portrait
    assert a.image != c.image and a.truth["ID"] != c.truth["ID"]


def test_no_seed_gives_varied_cards() -> None:
    ids = {make_specimen().truth["ID"] for _ in range(5)}
    assert len(ids) > 1


def test_no_expiry_holder_is_60_plus_and_has_no_date() -> None:
    truth = make_specimen(3, no_expiry=True).truth
    assert truth["ValidityPeriod"] == NO_EXPIRY_TEXT
    age = (dmy(truth["CurrentIssueDate"]) - dmy(truth["Birthday"])).days / 365.25
    assert age >= 60
    with pytest.raises(ValueError):
        dmy(truth["ValidityPeriod"])


def test_non_permanent_and_portuguese_name() -> None:
    truth = make_specimen(4, permanent=False, portuguese_name=True).truth
    assert truth["ResidentType"] == NON_PERMANENT
    assert truth["CnLastName"] == truth["CnFirstName"] == ""
    assert truth["LastNameCode"] == truth["FirstNameCode"] == ""
    assert truth["EnLastName"]


@pytest.mark.parametrize(
    "warnings",
    [
        (),
        ("covered",),
        ("photocopy",),
        ("screen_recapture",),
        ("tampered",),
        ("glare",),
        ("blurry",),
        ("covered", "glare", "blurry"),
    ],
)
def test_default_jpeg_is_small_and_carries_its_answer(warnings: tuple[str, ...]) -> None:
    spec = make_specimen(9, warnings=warnings)
    assert len(spec.image) <= MAX_JPEG_BYTES
    img = Image.open(io.BytesIO(spec.image))
    assert img.format == "JPEG"
    assert img.size[0] / img.size[1] == pytest.approx(85.6 / 53.98, rel=0.01)  # ID-1
    embedded = read_embedded(img)
    assert embedded is not None and embedded.truth == spec.truth
    assert len(spec.truth["WarnCardInfos"]) == len(warnings)


def test_png_carries_its_answer() -> None:
    spec = make_specimen(10, fmt="png", warnings=["-9104"])
    img = Image.open(io.BytesIO(spec.image))
    assert img.format == "PNG"
    embedded = read_embedded(img)
    assert embedded is not None and embedded.truth == spec.truth
    assert spec.truth["WarnCardInfos"] == [-9104]


def test_warnings_by_name_or_code_sorted_and_deduplicated() -> None:
    spec = make_specimen(1, warnings=["blurry", "-9101", "covered"])
    assert spec.truth["WarnCardInfos"] == [-9101, -9108]


@pytest.mark.parametrize("bad", ["sparkles", "-9109", "-1"])
def test_unknown_warning_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(bad)):
        make_specimen(1, warnings=[bad])


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="GIF"):
        make_specimen(1, fmt="GIF")


def test_warnings_are_visible_in_the_pixels() -> None:
    plain = pixels(make_specimen(12).image)
    copy = pixels(make_specimen(12, warnings=["photocopy"]).image)
    r, g, b = (ImageStat.Stat(copy).mean[i] for i in range(3))
    assert max(r, g, b) - min(r, g, b) < 2  # grey, like a photocopy
    pr, pg, pb = ImageStat.Stat(plain).mean
    assert max(pr, pg, pb) - min(pr, pg, pb) > 5

    def edges(img: Image.Image) -> float:
        return float(ImageStat.Stat(img.convert("L").filter(ImageFilter.FIND_EDGES)).mean[0])

    blurry = pixels(make_specimen(12, warnings=["blurry"]).image)
    assert edges(blurry) < 0.6 * edges(plain)
    glare = pixels(make_specimen(12, warnings=["glare"]).image)
    assert ImageStat.Stat(glare.convert("L")).mean[0] > ImageStat.Stat(plain.convert("L")).mean[0]


def test_portrait_is_the_photo_box() -> None:
    spec = make_specimen(13)
    img = Image.open(io.BytesIO(spec.portrait))
    left, top, right, bottom = PORTRAIT_BOX
    assert img.format == "JPEG" and img.size == (right - left, bottom - top)
    crop = pixels(spec.image).crop(PORTRAIT_BOX)
    crop_mean = ImageStat.Stat(crop.convert("L")).mean[0]
    assert abs(crop_mean - ImageStat.Stat(img.convert("L")).mean[0]) < 8


def test_plain_images_are_not_specimens() -> None:
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.new("RGB", (50, 30)).save(
            buf, fmt, **({"comment": b"hello"} if fmt == "JPEG" else {})
        )
        assert read_embedded(Image.open(io.BytesIO(buf.getvalue()))) is None


def test_repr_hides_personal_data() -> None:
    spec = make_specimen(14)
    text = repr(spec)
    for value in (spec.truth["ID"], spec.truth["EnLastName"], spec.truth["Birthday"]):
        assert value not in text


def test_cli_writes_the_card_and_prints_its_truth(tmp_path: Path) -> None:
    out = tmp_path / "card.jpg"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from worker.cli import main; main()",
            "specimen",
            str(out),
            "--seed",
            "15",
            "--warn",
            "glare",
            "--warn",
            "blurry",
            "--truth",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    expected = make_specimen(15, warnings=["glare", "blurry"])
    assert out.read_bytes() == expected.image
    assert json.loads(proc.stdout) == expected.truth


def test_cli_png_no_expiry(tmp_path: Path) -> None:
    out = tmp_path / "card.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from worker.cli import main; main()",
            "specimen",
            str(out),
            "--seed",
            "16",
            "--png",
            "--no-expiry",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert out.read_bytes() == make_specimen(16, fmt="PNG", no_expiry=True).image


def test_cli_bad_warning_names_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from worker.cli import main; main()",
            "specimen",
            str(tmp_path / "x.jpg"),
            "--warn",
            "sparkles",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "sparkles" in proc.stderr
    assert not (tmp_path / "x.jpg").exists()
