"""OcrClient reads emulator specimens: every field equals the specimen's answer key."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from emulator.app import create_app
from emulator.config import EmulatorConfig, Knobs
from emulator.specimen import Specimen, make_specimen
from worker.errors import PermanentError, ThrottledError
from worker.settings import Settings
from worker.tencent.client import ClientConfig, OcrClient, make_session
from worker.tencent.types import ImageInput, OcrRequest, OcrResult

SECRET_ID = "AKIDemulatortest"
SECRET_KEY = "emulator-test-key-0001"
DATE_FIELDS = ("Birthday", "FirstIssueDate", "CurrentIssueDate")


def as_api_fields(result: OcrResult) -> dict[str, Any]:
    """The result written back in the API's spelling, to compare with a specimen's truth."""

    def text(value: str | None) -> str:
        return "" if value is None else value

    fields: dict[str, Any] = {
        "CnLastName": text(result.cn_last_name),
        "EnLastName": text(result.en_last_name),
        "LastNameCode": text(result.last_name_code),
        "CnFirstName": text(result.cn_first_name),
        "EnFirstName": text(result.en_first_name),
        "FirstNameCode": text(result.first_name_code),
        "ID": text(result.id_number),
        "Sex": text(result.sex),
        "ValidityPeriod": text(result.validity_period_text),
        "Symbol": text(result.symbol),
        "Height": "" if result.height_m is None else str(result.height_m),
        "Angle": result.angle,
        "ResidentType": text(result.resident_type),
        "WarnCardInfos": [w.code for w in result.warnings],
    }
    for api, value in (
        ("Birthday", result.birthday),
        ("FirstIssueDate", result.first_issue_date),
        ("CurrentIssueDate", result.current_issue_date),
    ):
        fields[api] = "" if value is None else value.strftime("%d-%m-%Y")
    return fields


@pytest.fixture
async def emulator_client() -> AsyncIterator[Callable[..., Awaitable[OcrClient]]]:
    servers: list[TestServer] = []
    sessions: list[aiohttp.ClientSession] = []

    async def build(**knobs: Any) -> OcrClient:
        config = EmulatorConfig(credentials={SECRET_ID: SECRET_KEY}, knobs=Knobs(**knobs), seed=1)
        server = TestServer(create_app(config), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        settings = Settings(
            api_endpoint=f"http://127.0.0.1:{server.port}",
            secret_id=SecretStr(SECRET_ID),
            secret_key=SecretStr(SECRET_KEY),
            total_timeout_s=10,
        )
        session = make_session(settings)
        sessions.append(session)
        return OcrClient(session, ClientConfig.from_settings(settings))

    yield build
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()


def _check_against_truth(result: OcrResult, specimen: Specimen, portrait: bool) -> None:
    truth = {k: v for k, v in specimen.truth.items() if k != "RetImage"}
    assert as_api_fields(result) == truth
    assert result.request_id
    if portrait:
        assert result.portrait == specimen.portrait
    else:
        assert result.portrait is None


@pytest.mark.parametrize(
    ("seed", "options", "portrait"),
    [
        (11, {"warnings": ["glare", "photocopy"]}, True),
        (12, {"fmt": "PNG"}, False),
        (13, {"no_expiry": True}, True),
        (14, {"portuguese_name": True, "permanent": False, "warnings": ["blurry"]}, False),
    ],
)
async def test_specimen_fields_equal_truth(
    emulator_client: Any, seed: int, options: dict[str, Any], portrait: bool
) -> None:
    specimen = make_specimen(seed, **options)
    client = await emulator_client()
    result = await client.recognize(
        OcrRequest(front=ImageInput(data=specimen.image), portrait=portrait)
    )
    _check_against_truth(result, specimen, portrait)
    if options.get("no_expiry"):
        assert result.validity_not_a_date and result.validity_period is None
    else:
        assert result.validity_period is not None


async def test_warning_service_disabled(emulator_client: Any) -> None:
    specimen = make_specimen(21, warnings=["tampered"])
    client = await emulator_client(warning_service_disabled=True)
    result = await client.recognize(OcrRequest(front=ImageInput(data=specimen.image)))
    assert result.warning_service_disabled is True
    assert result.warnings == ()
    assert result.id_number == specimen.truth["ID"]


@pytest.mark.parametrize("charset", [False, True])
async def test_emulator_errors_are_translated(emulator_client: Any, charset: bool) -> None:
    specimen = make_specimen(31)
    client = await emulator_client(
        json_charset=charset, force_error_code="RequestLimitExceeded.UinLimitExceeded"
    )
    with pytest.raises(ThrottledError) as exc:
        await client.recognize(OcrRequest(front=ImageInput(data=specimen.image)))
    assert exc.value.code == "RequestLimitExceeded.UinLimitExceeded"
    assert exc.value.request_id


async def test_not_a_card_is_permanent(emulator_client: Any) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 40), (255, 255, 255)).save(buf, format="JPEG")
    client = await emulator_client()
    with pytest.raises(PermanentError) as exc:
        await client.recognize(OcrRequest(front=ImageInput(data=buf.getvalue())))
    assert exc.value.code == "FailedOperation.ImageNoSpecifiedCard"
