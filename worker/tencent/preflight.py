"""The producer's pre-flight: `validate_request` plus the checks that cost real work.

Those are decoding every inline image whole with Pillow (a truncated JPEG, or a thumbnail
too small to read, is refused instead of bought), and resolving every URL's host name to
refuse one that leads to a non-public address. The worker runs only `validate_request` at
each start: decoding and DNS per call would cost it CPU and latency for nothing, as the
producer ran them already.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Final

from PIL import Image, ImageFile

from worker.errors import InputError
from worker.netpolicy import PUBLIC_ONLY, IPAddress, UrlPolicy
from worker.tencent.types import OcrRequest
from worker.tencent.urls import Resolver, check_resolved, check_url
from worker.tencent.validation import validate_request

# Pillow's names for the formats the API takes.
ACCEPTED_FORMATS: Final = frozenset({"PNG", "JPEG", "MPO"})  # MPO: a phone's multi-picture JPEG


def check_image_decodes(data: bytes, side: str, *, min_side_px: int) -> tuple[int, int]:
    """The image must decode as a whole (every byte of its pixel data present) and its
    shortest side must be at least `min_side_px`. Returns (width, height)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Set by some other library in this process: Pillow would pad a cut image with grey.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; truncated images pass")
    try:
        with warnings.catch_warnings():
            # A decompression bomb is refused, not just warned about.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
                width, height = image.size
                if fmt not in ACCEPTED_FORMATS:
                    raise InputError(
                        "not_png_or_jpeg",
                        f"{side} image is neither PNG nor JPEG (rule not_png_or_jpeg)",
                    )
                if min(width, height) < min_side_px:
                    raise InputError(
                        "image_too_small",
                        f"{side} image is {width}x{height} px; its shortest side must be at "
                        f"least {min_side_px} px (MACAO_OCR_MIN_IMAGE_SIDE_PX) "
                        "(rule image_too_small)",
                    )
                if fmt != "PNG":
                    # Decode at 1/8 scale: libjpeg still reads every entropy-coded byte,
                    # so a cut file is still caught, at a quarter of the CPU.
                    image.draft(image.mode, (1, 1))
                image.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            "image_too_many_pixels",
            f"{side} image has more pixels than Pillow's safety limit (rule image_too_many_pixels)",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        # Pillow's own text names offsets and byte counts only, but we add nothing of it.
        raise InputError(
            "image_undecodable",
            f"{side} image does not decode as a whole (truncated or corrupt) "
            "(rule image_undecodable)",
        ) from None
    return width, height


@dataclass
class Preflight:
    """Every pre-flight rule for a request. One per submit or manifest: host names are
    resolved once each."""

    resolve: Resolver
    min_side_px: int
    policy: UrlPolicy = PUBLIC_ONLY
    _resolved: dict[str, list[IPAddress]] = field(default_factory=dict, repr=False)

    def _cached(self, host: str) -> list[IPAddress]:
        found = self._resolved.get(host)
        if found is None:
            found = self._resolved[host] = self.resolve(host)
        return found

    def check(self, request: OcrRequest) -> None:
        """Raises the first `InputError` found; no network beyond DNS, no call bought."""
        validate_request(request, self.policy)
        for side, image in (("front", request.front), ("back", request.back)):
            if image is None:
                continue
            if image.url is not None:
                parsed = check_url(image.url, side, self.policy)
                check_resolved(parsed, side, self._cached, self.policy)
            else:
                check_image_decodes(image.data or b"", side, min_side_px=self.min_side_px)
