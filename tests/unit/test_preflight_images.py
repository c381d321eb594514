"""Images must decode whole and be big enough to read; checked before a call is bought."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from worker.errors import InputError
from worker.tencent.preflight import check_image_decodes


def _image(fmt: str, size: tuple[int, int] = (640, 400)) -> bytes:
    buf = io.BytesIO()
    # Noise, so the JPEG has real entropy-coded data to cut.
    Image.effect_noise(size, 64).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_whole_images_pass(fmt: str) -> None:
    assert check_image_decodes(_image(fmt), "front", min_side_px=200) == (640, 400)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_image_cut_in_half_is_refused(fmt: str) -> None:
    data = _image(fmt)
    with pytest.raises(InputError) as info:
        check_image_decodes(data[: len(data) // 2], "back", min_side_px=200)
    assert info.value.rule == "image_undecodable"
    assert "back" in info.value.message


def test_a_thumbnail_is_refused_with_the_setting_named() -> None:
    with pytest.raises(InputError) as info:
        check_image_decodes(_image("JPEG", (8, 8)), "front", min_side_px=200)
    assert info.value.rule == "image_too_small"
    assert "8x8" in info.value.message and "MACAO_OCR_MIN_IMAGE_SIDE_PX" in info.value.message


def test_minimum_side_is_the_shortest_side() -> None:
    check_image_decodes(_image("PNG", (1000, 200)), "front", min_side_px=200)
    with pytest.raises(InputError, match="image_too_small"):
        check_image_decodes(_image("PNG", (1000, 199)), "front", min_side_px=200)
    check_image_decodes(_image("PNG", (8, 8)), "front", min_side_px=0)


def test_magic_bytes_alone_are_not_an_image() -> None:
    with pytest.raises(InputError, match="image_undecodable"):
        check_image_decodes(b"\xff\xd8\xff" + b"\0" * 5000, "front", min_side_px=200)


def test_nothing_in_the_package_turns_truncated_loading_on() -> None:
    # Pillow pads a cut image with grey when this global is on; importing every module we
    # ship (worker, emulator, demo) must leave it off.
    code = (
        "import importlib, pkgutil, PIL.ImageFile as F\n"
        "import worker, emulator, demo\n"
        "for pkg in (worker, emulator, demo):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not m.name.endswith('__main__'):\n"
        "            importlib.import_module(m.name)\n"
        "print(F.LOAD_TRUNCATED_IMAGES)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("missing", [2, 10, 200])
def test_a_jpeg_missing_only_its_last_bytes_is_refused(missing: int) -> None:
    # The decode runs at a reduced scale for speed; it must still read every byte.
    data = _image("JPEG")
    with pytest.raises(InputError, match="image_undecodable"):
        check_image_decodes(data[:-missing], "front", min_side_px=200)
