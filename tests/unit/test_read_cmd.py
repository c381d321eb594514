"""`macao-ocr read`: the real command in a subprocess against a local signature-checking stub."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from worker.cli.read_cmd import result_json
from worker.tencent import signing
from worker.tencent.types import CardWarning, OcrResult

SECRET_ID = "AKIDcli"
SECRET_KEY = "cli-SECRET-key-never-printed"
CLI = str(Path(sys.executable).parent / "macao-ocr")
PORTRAIT = b"\xff\xd8\xff-portrait"

FIELDS = {
    "CnLastName": "陳",
    "EnLastName": "CHAN",
    "LastNameCode": "7115",
    "CnFirstName": "大文",
    "EnFirstName": "TAI MAN",
    "FirstNameCode": "1129 2429",
    "ID": "1234567(8)",
    "Birthday": "05-03-1990",
    "Sex": "M",
    "FirstIssueDate": "01-02-2008",
    "CurrentIssueDate": "15-06-2020",
    "ValidityPeriod": "永久有效",
    "Symbol": "ASM",
    "Height": "1.64",
    "Angle": 0,
    "ResidentType": "Permanent Resident Identity Card",
    "WarnCardInfos": [-9103, -9109],
}


@dataclass
class Stub:
    mode: str = "success"
    bodies: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            expected = signing.sign(
                secret_id=SECRET_ID,
                secret_key=SECRET_KEY,
                service="ocr",
                host=self.headers["Host"],
                content_type=self.headers["Content-Type"],
                body=body,
                timestamp=int(self.headers["X-TC-Timestamp"]),
            )
            state.bodies.append(json.loads(body))
            inner: dict[str, Any]
            if self.headers["Authorization"] != expected.authorization:
                inner = {"Error": {"Code": "AuthFailure.SignatureFailure", "Message": "bad"}}
            elif state.mode == "error":
                inner = {
                    "Error": {"Code": "FailedOperation.ImageNoSpecifiedCard", "Message": "no card"}
                }
            else:
                inner = dict(FIELDS)
                if json.loads(json.loads(body).get("Config", "{}")).get("RetImage") == "portrait":
                    inner["RetImage"] = base64.b64encode(PORTRAIT).decode()
            payload = json.dumps({"Response": {**inner, "RequestId": "cli-req-1"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def card(tmp_path: Path) -> Path:
    path = tmp_path / "front.jpg"
    Image.new("RGB", (240, 200)).save(path, format="JPEG")  # over the 200 px minimum
    return path


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("MACAO_OCR_", "TENCENTCLOUD_"))
    }
    return subprocess.run(
        [CLI, "read", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def access_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file: `read` logs every read in access_log before its call."""
    import migrations

    url = f"sqlite:///{tmp_path_factory.mktemp('read') / 'access.db'}"
    migrations.upgrade(url)
    return url


ACCESS_DB: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _access_db(access_db: str) -> None:
    ACCESS_DB["url"] = access_db


def creds(stub: Stub) -> dict[str, str]:
    return {
        "MACAO_OCR_DATABASE_URL": ACCESS_DB["url"],
        "MACAO_OCR_API_ENDPOINT": stub.url,
        "TENCENTCLOUD_SECRET_ID": SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
    }


def test_json_output_and_portrait(stub: Stub, card: Path, tmp_path: Path) -> None:
    portrait = tmp_path / "portrait.jpg"
    proc = run([str(card), "--json", "--portrait-out", str(portrait)], creds(stub))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # stdout is exactly one JSON object: logs go to stderr
    assert data["id_number"] == "1234567(8)"
    assert data["cn_last_name"] == "陳" and data["en_first_name"] == "TAI MAN"
    assert data["birthday"] == "1990-03-05"
    assert data["validity_period"] == "永久有效"
    assert data["height"] == "1.64"
    assert data["warnings"] == [{"code": -9103, "name": "screen_recapture"}]
    assert data["warning_service_disabled"] is True
    assert data["request_id"] == "cli-req-1"
    assert portrait.read_bytes() == PORTRAIT
    (body,) = stub.bodies
    assert json.loads(body["Config"]) == {"RetImage": "portrait"}
    assert base64.b64decode(body["ImageBase64"]) == card.read_bytes()
    assert SECRET_KEY not in proc.stdout + proc.stderr


def test_table_output_with_back_url(stub: Stub, card: Path) -> None:
    proc = run([str(card), "--back", "https://example.com/back.jpg"], creds(stub))
    assert proc.returncode == 0, proc.stderr
    assert "1234567(8)" in proc.stdout and "screen_recapture" in proc.stdout
    (body,) = stub.bodies
    assert body["BackImageUrl"] == "https://example.com/back.jpg"
    assert "Config" not in body


def test_api_error_exits_non_zero(stub: Stub, card: Path) -> None:
    stub.mode = "error"
    proc = run([str(card), "--json"], creds(stub))
    assert proc.returncode == 1
    assert "FailedOperation.ImageNoSpecifiedCard" in proc.stderr
    assert "no card" in proc.stderr and "cli-req-1" in proc.stderr
    assert proc.stdout == ""


def test_missing_credentials(stub: Stub, card: Path) -> None:
    proc = run([str(card)], {"MACAO_OCR_API_ENDPOINT": stub.url})
    assert proc.returncode == 2
    assert "TENCENTCLOUD_SECRET_ID" in proc.stderr and "TENCENTCLOUD_SECRET_KEY" in proc.stderr
    assert stub.bodies == []


def test_rejected_input_makes_no_call(stub: Stub, tmp_path: Path) -> None:
    gif = tmp_path / "card.gif"
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    proc = run([str(gif)], creds(stub))
    assert proc.returncode == 2
    assert "gif_not_supported" in proc.stderr and "front" in proc.stderr
    proc = run([str(tmp_path / "missing.jpg")], creds(stub))
    assert proc.returncode == 2
    assert "missing.jpg" in proc.stderr
    assert stub.bodies == []


def _access_rows(url: str) -> list[tuple[object, ...]]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT actor, tenant, job_id, how FROM access_log")))
    finally:
        engine.dispose()


def test_each_read_is_logged_before_its_call(stub: Stub, card: Path) -> None:
    before = len(_access_rows(ACCESS_DB["url"]))
    proc = run([str(card), "--json"], creds(stub))
    assert proc.returncode == 0, proc.stderr
    rows = _access_rows(ACCESS_DB["url"])
    assert len(rows) == before + 1
    actor, tenant, job_id, how = rows[-1]
    assert (tenant, job_id, how) == ("default", None, "cli.read")
    assert "@" in str(actor)


def test_a_read_that_cannot_be_logged_buys_nothing(stub: Stub, card: Path, tmp_path: Path) -> None:
    unmigrated = f"sqlite:///{tmp_path / 'empty.db'}"
    proc = run([str(card), "--json"], {**creds(stub), "MACAO_OCR_DATABASE_URL": unmigrated})
    assert proc.returncode == 1
    assert "database_not_migrated" in proc.stderr
    assert proc.stdout == "" and stub.bodies == []


def test_result_json_keys() -> None:
    result = OcrResult(
        request_id="r",
        id_number="5123456(7)",
        birthday=date(2001, 2, 3),
        validity_period=date(2031, 1, 1),
        validity_period_text="01-01-2031",
        height_m=Decimal("1.7"),
        warnings=(CardWarning(-9108, "blurry"),),
        portrait=b"never in json",
    )
    data = result_json(result)
    assert sorted(data) == sorted(
        [
            "cn_last_name",
            "en_last_name",
            "last_name_code",
            "cn_first_name",
            "en_first_name",
            "first_name_code",
            "id_number",
            "birthday",
            "sex",
            "first_issue_date",
            "current_issue_date",
            "validity_period",
            "validity_period_text",
            "symbol",
            "height",
            "angle",
            "resident_type",
            "warnings",
            "warning_service_disabled",
            "request_id",
        ]
    )
    assert data["validity_period"] == "2031-01-01"
    assert data["birthday"] == "2001-02-03"
    assert data["height"] == "1.70"
    assert data["warnings"] == [{"code": -9108, "name": "blurry"}]
    json.dumps(data)  # serialisable as is
