"""Specimen Macao resident ID cards drawn with Pillow, carrying their own answer key.

Each specimen embeds the exact fields Tencent would return for it (plus its portrait crop)
in a JPEG COM segment or a PNG tEXt chunk, so the emulator recovers them from a header
read without decoding pixels. All people on specimens are invented.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from PIL import Image, ImageDraw, ImageFilter, ImageFont
from PIL.PngImagePlugin import PngInfo

from worker.tencent.types import WARNING_CODES, WARNING_NAMES

# ID-1 card proportions (85.60 x 53.98 mm) at about 254 dpi.
CARD_W: Final = 856
CARD_H: Final = 540
PORTRAIT_BOX: Final = (40, 150, 250, 420)  # left, top, right, bottom
MAX_JPEG_BYTES: Final = 60 * 1024

PAYLOAD_MAGIC: Final = b"MACAO-OCR-SPECIMEN/1 "
PNG_TEXT_KEY: Final = "macao-ocr-specimen"

PERMANENT: Final = "Permanent Resident Identity Card"
NON_PERMANENT: Final = "Non-permanent Resident Identity Card"
# What a card of a holder aged 60+ shows instead of an expiry date ("valid permanently").
NO_EXPIRY_TEXT: Final = "永久有效"

# The answer key's dates sit before this day so that a seed always gives the same card.
_REFERENCE_DAY: Final = date(2025, 1, 1)

# (Chinese, Macao romanisation, Chinese Commercial Code telecode)
_SURNAMES: Final = (
    ("陳", "CHAN", "7115"),
    ("李", "LEI", "2621"),
    ("黃", "WONG", "7806"),
    ("何", "HO", "0149"),
    ("梁", "LEONG", "2733"),
    ("張", "CHEONG", "1728"),
    ("林", "LAM", "2651"),
    ("吳", "NG", "0702"),
    ("劉", "LAO", "0491"),
    ("鄭", "CHEANG", "6774"),
    ("周", "CHAO", "0719"),
    ("楊", "IEONG", "2799"),
)
_GIVEN: Final = (
    ("大", "TAI", "1129"),
    ("文", "MAN", "2429"),
    ("明", "MENG", "2494"),
    ("華", "WA", "5478"),
    ("美", "MEI", "5019"),
    ("玲", "LENG", "3781"),
    ("偉", "WAI", "0251"),
    ("國", "KUOK", "0948"),
    ("志", "CHI", "1807"),
    ("英", "IENG", "5391"),
    ("麗", "LAI", "7787"),
    ("芳", "FONG", "5364"),
    ("家", "KA", "1367"),
    ("欣", "IAN", "2450"),
)
# Holders without a Chinese name: the Cn* and *Code fields come back empty.
_PT_SURNAMES: Final = ("DA SILVA", "FERREIRA", "SOUSA", "ROCHA", "MARQUES")
_PT_GIVEN: Final = ("JOAO PEDRO", "MARIA JOSE", "ANTONIO", "ANA SOFIA", "RUI")

_CJK_FONT_CANDIDATES: Final = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
)
_LATIN_FONT_CANDIDATES: Final = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)
_LATIN_BOLD_CANDIDATES: Final = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf",
)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True, repr=False)
class Specimen:
    """A card image, the fields Tencent would return for it, and its portrait crop (JPEG)."""

    image: bytes
    truth: dict[str, Any]
    portrait: bytes
    fmt: str = "JPEG"
    seed: int = 0
    warnings: tuple[int, ...] = field(default=())

    def __repr__(self) -> str:
        return f"Specimen({self.fmt}, seed={self.seed}, {len(self.image)} bytes, fields=<redacted>)"


def warning_code(name_or_code: str | int) -> int:
    """Resolve a warning given by name (`glare`), code (`-9107`) or int to its code."""
    if isinstance(name_or_code, int):
        code = name_or_code
    else:
        text = name_or_code.strip()
        if text in WARNING_CODES:
            return WARNING_CODES[text]
        try:
            code = int(text)
        except ValueError:
            raise ValueError(
                f"unknown warning {text!r}: use one of {', '.join(sorted(WARNING_CODES))}"
            ) from None
    if code not in WARNING_NAMES:
        raise ValueError(f"unknown warning code {code}: use one of {sorted(WARNING_NAMES)}")
    return code


def make_specimen(
    seed: int | None = None,
    *,
    warnings: Sequence[str | int] = (),
    fmt: str = "JPEG",
    no_expiry: bool = False,
    permanent: bool = True,
    portuguese_name: bool = False,
    valid_on: date | None = None,
    fields: Mapping[str, Any] | None = None,
    answer: Mapping[str, Any] | None = None,
) -> Specimen:
    """Draw one specimen card. The same seed and options always give the same bytes.

    `valid_on`: move the card's dates (birth included, so the age at issue stays) by whole
    years so that it is valid, and not about to expire, on that day. `fields`: any answer
    field set as given, after the rest is invented (API names, e.g. `{"ID": "9234567(8)"}`;
    `WarnCardInfos` replaces the drawn warnings' codes, so unlisted codes can be answered):
    a card that trips any check. `answer` overrides fields of the embedded answer key only
    (the card is drawn from the invented ones), e.g. an ID number far longer than a real one."""
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt not in ("JPEG", "PNG"):
        raise ValueError(f"fmt must be JPEG or PNG, not {fmt!r}")
    codes = sorted({warning_code(w) for w in warnings}, key=abs)
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    truth = _invent_fields(rng, no_expiry=no_expiry, permanent=permanent, pt=portuguese_name)
    truth["WarnCardInfos"] = codes
    if valid_on is not None:
        _shift_years(truth, valid_on.year - _REFERENCE_DAY.year)
    for name, value in (fields or {}).items():
        if name not in _FIELD_NAMES:
            raise ValueError(f"unknown field {name!r}: use one of {', '.join(_FIELD_NAMES)}")
        truth[name] = value

    # Drawn as text whatever a caller set a field to (None: left blank).
    shown = {
        k: v if isinstance(v, list) else ("" if v is None else str(v)) for k, v in truth.items()
    }
    card = _draw_card(rng, shown)
    card = _apply_warnings(card, codes, rng)
    if answer:
        truth.update(answer)
    portrait = _encode_jpeg(card.crop(PORTRAIT_BOX), quality=80)
    payload = json.dumps(
        {"truth": truth, "portrait": base64.b64encode(portrait).decode("ascii")},
        ensure_ascii=True,
        sort_keys=True,
        separators=(",", ":"),
    )
    image = _encode_card(card, fmt, payload)
    return Specimen(
        image=image, truth=truth, portrait=portrait, fmt=fmt, seed=seed, warnings=tuple(codes)
    )


@dataclass(frozen=True)
class Embedded:
    """What a specimen carries about itself."""

    truth: dict[str, Any]
    portrait_b64: str


def read_embedded(img: Image.Image) -> Embedded | None:
    """The answer key of an opened (header-only) image, or None when it is not a specimen."""
    raw: Any = None
    if img.format == "JPEG":
        for marker, data in getattr(img, "applist", ()):
            if marker == "COM" and data.startswith(PAYLOAD_MAGIC):
                raw = data[len(PAYLOAD_MAGIC) :]
                break
    elif img.format == "PNG":
        raw = img.info.get(PNG_TEXT_KEY)
    if raw is None:
        return None
    try:
        payload = json.loads(raw)
        truth = payload["truth"]
        portrait_b64 = payload["portrait"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(truth, dict) or not isinstance(portrait_b64, str):
        return None
    return Embedded(truth=truth, portrait_b64=portrait_b64)


# ---------------------------------------------------------------- the invented holder


def _dmy(d: date) -> str:
    return d.strftime("%d-%m-%Y")


def _add_years(d: date, years: int) -> date:
    try:
        return d.replace(year=d.year + years)
    except ValueError:  # 29 February
        return d.replace(year=d.year + years, day=28)


def _invent_fields(
    rng: random.Random, *, no_expiry: bool, permanent: bool, pt: bool
) -> dict[str, Any]:
    if pt:
        cn_last = cn_first = last_code = first_code = ""
        en_last = rng.choice(_PT_SURNAMES)
        en_first = rng.choice(_PT_GIVEN)
    else:
        cn_last, en_last, last_code = rng.choice(_SURNAMES)
        given = rng.sample(_GIVEN, rng.choice((1, 2, 2, 2)))
        cn_first = "".join(g[0] for g in given)
        en_first = " ".join(g[1] for g in given)
        first_code = " ".join(g[2] for g in given)

    current_issue = _REFERENCE_DAY - timedelta(days=rng.randrange(30, 9 * 365))
    age_at_issue = rng.randrange(60, 86) if no_expiry else rng.randrange(18, 60)
    birthday = _add_years(current_issue, -age_at_issue) - timedelta(days=rng.randrange(0, 365))
    first_issue = (
        current_issue
        if rng.random() < 0.25
        else _add_years(birthday, rng.randrange(0, age_at_issue))
        + timedelta(days=rng.randrange(0, 300))
    )
    first_issue = min(first_issue, current_issue)
    validity = NO_EXPIRY_TEXT if no_expiry else _dmy(_add_years(current_issue, 10))

    sex = rng.choice(("M", "F"))
    place = rng.choices("ABCD", weights=(60, 8, 25, 7))[0]
    symbol = place + ("S" if place == "A" and rng.random() < 0.7 else "") + sex
    leading = rng.choice("157")
    body = "".join(str(rng.randrange(10)) for _ in range(6))
    card_id = f"{leading}{body}({rng.randrange(10)})"
    height_cm = rng.randrange(150, 191)

    return {
        "CnLastName": cn_last,
        "EnLastName": en_last,
        "LastNameCode": last_code,
        "CnFirstName": cn_first,
        "EnFirstName": en_first,
        "FirstNameCode": first_code,
        "ID": card_id,
        "Birthday": _dmy(birthday),
        "Sex": sex,
        "FirstIssueDate": _dmy(first_issue),
        "CurrentIssueDate": _dmy(current_issue),
        "ValidityPeriod": validity,
        "Symbol": symbol,
        "Height": f"{height_cm // 100}.{height_cm % 100:02d}",
        "RetImage": "",
        "Angle": None,
        "ResidentType": PERMANENT if permanent else NON_PERMANENT,
    }


_FIELD_NAMES: Final = (
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
    "Angle",
    "ResidentType",
    "WarnCardInfos",
)


def _shift_years(truth: dict[str, Any], years: int) -> None:
    """Move every date of the answer key by `years` (a no-expiry text stays as it is)."""
    for name in ("Birthday", "FirstIssueDate", "CurrentIssueDate", "ValidityPeriod"):
        try:
            day = datetime.strptime(truth[name], "%d-%m-%Y").date()
        except ValueError:
            continue
        truth[name] = _dmy(_add_years(day, years))


# ---------------------------------------------------------------- drawing


def _first_existing(paths: Sequence[str]) -> str | None:
    return next((p for p in paths if Path(p).is_file()), None)


@lru_cache(maxsize=32)
def _font(size: int, *, bold: bool = False, cjk: bool = False) -> Font | None:
    """A font of `size` px; None for CJK when the machine has no CJK font."""
    if cjk:
        path = _first_existing(_CJK_FONT_CANDIDATES)
        return ImageFont.truetype(path, size) if path else None
    path = _first_existing(_LATIN_BOLD_CANDIDATES if bold else _LATIN_FONT_CANDIDATES)
    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def _is_cjk(ch: str) -> bool:
    return ord(ch) >= 0x2E80


def _text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    size: int,
    fill: tuple[int, ...],
    *,
    bold: bool = False,
) -> float:
    """Draw mixed Latin/CJK text; returns the x where it ended.

    Without a CJK font each Chinese character becomes an outlined box, which keeps the
    layout honest (the answer key, not the pixels, is what the emulator reads).
    """
    x, y = xy
    latin = _font(size, bold=bold)
    cjk = _font(size, cjk=True)
    for ch in text:
        if _is_cjk(ch):
            if cjk is not None:
                draw.text((x, y), ch, font=cjk, fill=fill)
                x += cjk.getlength(ch)
            else:
                pad = size * 0.1
                draw.rectangle((x + pad, y + pad, x + size - pad, y + size - pad), outline=fill)
                draw.line((x + pad, y + pad, x + size - pad, y + size - pad), fill=fill)
                x += size
        else:
            assert latin is not None
            draw.text((x, y), ch, font=latin, fill=fill)
            x += latin.getlength(ch)
    return x


def _guilloche(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    """Fine security-print curves, light enough to compress well."""
    for k in range(9):
        amp = rng.uniform(18, 40)
        period = rng.uniform(90, 200)
        phase = rng.uniform(0, math.tau)
        y0 = 60 + k * 55
        colour = (200 + rng.randrange(30), 215 + rng.randrange(25), 225 + rng.randrange(25))
        points = [
            (x, y0 + amp * math.sin(phase + x * math.tau / period)) for x in range(0, CARD_W, 6)
        ]
        draw.line(points, fill=colour, width=1)


def _portrait(rng: random.Random, sex: str) -> Image.Image:
    """An invented head-and-shoulders photo, drawn on its own canvas so nothing spills out."""
    left, top, right, bottom = PORTRAIT_BOX
    w, h = right - left, bottom - top
    photo = Image.new("RGB", (w, h), (214, 228, 240))
    draw = ImageDraw.Draw(photo)
    cx = w // 2
    skin = rng.choice(((241, 204, 170), (224, 180, 140), (198, 150, 110), (250, 220, 190)))
    hair = rng.choice(((30, 25, 20), (60, 45, 35), (90, 90, 90), (20, 20, 25)))
    shirt = rng.choice(((40, 60, 110), (120, 30, 40), (50, 90, 60), (70, 70, 70)))
    draw.ellipse((cx - 95, h - 70, cx + 95, h + 110), fill=shirt)  # shoulders
    draw.rectangle((cx - 20, h - 100, cx + 20, h - 55), fill=skin)  # neck
    hair_drop = 60 if sex == "F" else 10
    draw.ellipse((cx - 62, 28, cx + 62, 160 + hair_drop), fill=hair)
    draw.ellipse((cx - 52, 50, cx + 52, 185), fill=skin)  # face
    for dx in (-20, 20):
        draw.ellipse((cx + dx - 6, 100, cx + dx + 6, 108), fill=(40, 30, 30))
    draw.arc((cx - 16, 135, cx + 16, 156), 20, 160, fill=(150, 70, 70), width=3)
    draw.rectangle((0, 0, w - 1, h - 1), outline=(90, 100, 120), width=2)
    return photo


def _draw_card(rng: random.Random, truth: dict[str, Any]) -> Image.Image:
    permanent = truth["ResidentType"] == PERMANENT
    base = (232, 240, 246) if permanent else (244, 238, 226)
    card = Image.new("RGB", (CARD_W, CARD_H), base)
    draw = ImageDraw.Draw(card)
    _guilloche(draw, rng)
    ink = (25, 35, 60)
    grey = (95, 105, 125)

    band = (16, 80, 150) if permanent else (150, 90, 20)
    draw.rectangle((0, 0, CARD_W, 58), fill=band)
    _text(draw, (24, 6), "澳門特別行政區", 20, (255, 255, 255), bold=True)
    _text(draw, (24, 32), "REGIÃO ADMINISTRATIVA ESPECIAL DE MACAU", 15, (255, 255, 255))
    kind_cn = "澳門永久性居民身份證" if permanent else "澳門非永久性居民身份證"
    kind_pt = "BILHETE DE IDENTIDADE DE RESIDENTE" + ("" if permanent else " NÃO") + " PERMANENTE"
    _text(draw, (24, 68), kind_cn, 20, ink, bold=True)
    _text(draw, (24, 96), kind_pt, 14, grey)

    card.paste(_portrait(rng, truth["Sex"]), PORTRAIT_BOX[:2])

    x0, y = 280, 140
    cn_name = truth["CnLastName"] + truth["CnFirstName"]
    if cn_name:
        _text(draw, (x0, y), "姓名/Nome", 13, grey)
        _text(draw, (x0, y + 16), cn_name, 30, ink, bold=True)
        y += 52
    _text(draw, (x0, y), f"{truth['EnLastName']}, {truth['EnFirstName']}", 22, ink, bold=True)
    y += 30
    codes = " ".join(c for c in (truth["LastNameCode"], truth["FirstNameCode"]) if c)
    if codes:
        _text(draw, (x0, y), f"({codes})", 16, ink)
        y += 26

    rows = (
        (("出生日期/Data de nascimento", truth["Birthday"]), ("性別/Sexo", truth["Sex"])),
        (
            ("身高/Altura", truth["Height"]),
            ("首次發證日期/Data de emissão inicial", truth["FirstIssueDate"]),
        ),
        (
            ("簽發日期/Data de emissão", truth["CurrentIssueDate"]),
            ("有效期至/Válido até", truth["ValidityPeriod"]),
        ),
    )
    for left_field, right_field in rows:
        for dx, (label, value) in ((0, left_field), (280, right_field)):
            _text(draw, (x0 + dx, y), label, 12, grey)
            _text(draw, (x0 + dx, y + 15), value, 19, ink, bold=True)
        y += 46

    _text(draw, (x0, CARD_H - 80), truth["Symbol"], 30, ink, bold=True)
    id_font = _font(38, bold=True)
    assert id_font is not None
    id_w = id_font.getlength(truth["ID"])
    _text(draw, (CARD_W - 40 - id_w, CARD_H - 84), truth["ID"], 38, ink, bold=True)

    # Diagonal SPECIMEN marking, blended so the fields stay legible.
    mark = Image.new("L", (CARD_W, CARD_H), 0)
    mdraw = ImageDraw.Draw(mark)
    mfont = _font(120, bold=True)
    assert mfont is not None
    mdraw.text((CARD_W / 2, CARD_H / 2), "SPECIMEN", font=mfont, fill=90, anchor="mm")
    mark = mark.rotate(18, resample=Image.Resampling.BICUBIC)
    card.paste(Image.new("RGB", card.size, (200, 30, 40)), (0, 0), mark)
    return card


# ---------------------------------------------------------------- warnings


def _apply_warnings(card: Image.Image, codes: Sequence[int], rng: random.Random) -> Image.Image:
    for code in codes:
        card = _EFFECTS[code](card, rng)
    return card


def _covered(card: Image.Image, rng: random.Random) -> Image.Image:
    draw = ImageDraw.Draw(card)
    x = rng.randrange(420, 640)
    draw.ellipse((x, 200, x + 150, CARD_H + 120), fill=(226, 182, 150))  # a thumb
    return card


def _photocopy(card: Image.Image, rng: random.Random) -> Image.Image:
    grey = card.convert("L").point(lambda v: 255 if v > 170 else max(0, v - 40))
    return grey.filter(ImageFilter.SMOOTH).convert("RGB")


def _screen(card: Image.Image, rng: random.Random) -> Image.Image:
    overlay = Image.new("RGB", card.size, (120, 140, 255))
    mask = Image.new("L", card.size, 0)
    draw = ImageDraw.Draw(mask)
    for y in range(0, CARD_H, 4):  # scan lines of the display being photographed
        draw.line((0, y, CARD_W, y + 6), fill=38)
    return Image.composite(overlay, card, mask)


def _tampered(card: Image.Image, rng: random.Random) -> Image.Image:
    draw = ImageDraw.Draw(card)
    box = (CARD_W - 330, CARD_H - 92, CARD_W - 30, CARD_H - 36)
    draw.rectangle(box, fill=(246, 246, 240))  # a pasted-over patch
    _text(
        draw,
        (box[0] + 12, box[1] + 6),
        "7" + "".join(str(rng.randrange(10)) for _ in range(6)),
        34,
        (10, 10, 10),
    )
    return card


def _glare(card: Image.Image, rng: random.Random) -> Image.Image:
    cx, cy = rng.randrange(300, 600), rng.randrange(150, 350)
    mask = Image.new("L", card.size, 0)
    ImageDraw.Draw(mask).ellipse((cx - 140, cy - 90, cx + 140, cy + 90), fill=230)
    mask = mask.filter(ImageFilter.GaussianBlur(40))
    return Image.composite(Image.new("RGB", card.size, (255, 255, 255)), card, mask)


def _blurry(card: Image.Image, rng: random.Random) -> Image.Image:
    return card.filter(ImageFilter.GaussianBlur(2.6))


_EFFECTS: Final = {
    -9101: _covered,
    -9102: _photocopy,
    -9103: _screen,
    -9104: _tampered,
    -9107: _glare,
    -9108: _blurry,
}


# ---------------------------------------------------------------- encoding


def _encode_jpeg(img: Image.Image, *, quality: int, comment: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": quality, "optimize": True}
    if comment is not None:
        kwargs["comment"] = comment
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _encode_card(card: Image.Image, fmt: str, payload: str) -> bytes:
    if fmt == "PNG":
        info = PngInfo()
        info.add_text(PNG_TEXT_KEY, payload)
        buf = io.BytesIO()
        card.save(buf, "PNG", pnginfo=info, optimize=True)
        return buf.getvalue()
    comment = PAYLOAD_MAGIC + payload.encode("ascii")
    # Highest quality that keeps the file within the size the project promises.
    for quality in range(85, 29, -5):
        data = _encode_jpeg(card, quality=quality, comment=comment)
        if len(data) <= MAX_JPEG_BYTES:
            return data
    return data
