"""Starting the emulator: credentials, knobs from flags and environment, the subprocess fixture."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from emulator.config import KnobError, Knobs, apply_knobs, load_credentials
from emulator.specimen import make_specimen
from tests.fixtures.emulator import READY_PREFIX, EmulatorProcess, tc3_headers

CARD = make_specimen(51)


def clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TENCENTCLOUD_", "MACAO_OCR_EMULATOR_"))
    }


def call(emu: EmulatorProcess, secret_id: str, secret_key: str) -> dict[str, object]:
    body = json.dumps({"ImageBase64": base64.b64encode(CARD.image).decode()}).encode()
    headers = tc3_headers(secret_id=secret_id, secret_key=secret_key, host=emu.host, body=body)
    req = urllib.request.Request(emu.url + "/", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc: dict[str, object] = json.loads(resp.read())["Response"]
        return doc


def test_refuses_to_start_without_credentials_naming_the_variables() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert proc.returncode == 2
    assert "TENCENTCLOUD_SECRET_ID" in proc.stderr and "TENCENTCLOUD_SECRET_KEY" in proc.stderr
    assert READY_PREFIX not in proc.stdout


def test_bad_knob_in_environment_is_refused_by_name() -> None:
    env = {
        **clean_env(),
        "TENCENTCLOUD_SECRET_ID": "a",
        "TENCENTCLOUD_SECRET_KEY": "b",
        "MACAO_OCR_EMULATOR_OCR_FAILED": "2.5",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert "ocr_failed" in proc.stderr


def test_fixture_emulator_answers_with_the_specimen_truth(emulator: EmulatorProcess) -> None:
    resp = call(emulator, emulator.secret_id, emulator.secret_key)
    assert resp["ID"] == CARD.truth["ID"]
    assert emulator.counters()["by_secret_id"] == {emulator.secret_id: 1}
    emulator.configure(ocr_failed=1.0)
    assert call(emulator, emulator.secret_id, emulator.secret_key)["Error"] == {
        "Code": "FailedOperation.OcrFailed",
        "Message": "OCR recognition failed.",
    }
    emulator.reset(knobs=True)
    assert emulator.counters()["total"] == 0
    assert "Error" not in call(emulator, emulator.secret_id, emulator.secret_key)
    assert emulator.env()["MACAO_OCR_API_ENDPOINT"] == emulator.url


def test_factory_knobs_go_through_the_environment(
    emulator_factory: Callable[..., EmulatorProcess],
) -> None:
    emu = emulator_factory(
        force_error_code="FailedOperation.UnOpenError",
        quota_per_s=9,
        warning_service_disabled=True,
    )
    knobs = emu.configure()
    assert (knobs["force_error_code"], knobs["quota_per_s"], knobs["warning_service_disabled"]) == (
        "FailedOperation.UnOpenError",
        9,
        True,
    )
    assert call(emu, emu.secret_id, emu.secret_key)["Error"]["Code"] == (  # type: ignore[index]
        "FailedOperation.UnOpenError"
    )


def test_extra_credentials_from_a_file(emulator_factory: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_factory(credentials={"AKIDsecond": "second-key", "AKIDthird": "third-key"})
    for sid, key in [
        (emu.secret_id, emu.secret_key),
        ("AKIDsecond", "second-key"),
        ("AKIDthird", "third-key"),
    ]:
        assert call(emu, sid, key)["ID"] == CARD.truth["ID"]
    assert call(emu, "AKIDsecond", "third-key")["Error"]["Code"] == (  # type: ignore[index]
        "AuthFailure.SignatureFailure"
    )


def test_macao_ocr_emulator_command_serves(tmp_path: Path) -> None:
    log = tmp_path / "emu.log"
    env = clean_env()
    env["MACAO_OCR_EMULATOR_TOKEN"] = "cli-control-token"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from worker.cli import main; main()",
                "emulator",
                "--port",
                "0",
                "--credential",
                "AKIDcli:cli-key",
                "--quota-per-s",
                "4",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while READY_PREFIX not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        line = next(x for x in log.read_text().splitlines() if x.startswith(READY_PREFIX))
        url = line[len(READY_PREFIX) :]
        emu = EmulatorProcess(
            url=url, secret_id="AKIDcli", secret_key="cli-key", process=proc, log_path=log,
            control_token="cli-control-token",
        )  # fmt: skip
        assert call(emu, "AKIDcli", "cli-key")["ID"] == CARD.truth["ID"]
        assert emu.configure()["quota_per_s"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def test_load_credentials_sources(tmp_path: Path) -> None:
    creds_file = tmp_path / "creds"
    creds_file.write_text("# team keys\nAKIDfile:file-key\n\n")
    creds = load_credentials(
        environ={"TENCENTCLOUD_SECRET_ID": "AKIDenv", "TENCENTCLOUD_SECRET_KEY": "env-key"},
        pairs=["AKIDflag:flag:key:with:colons"],
        files=[creds_file],
    )
    assert creds == {
        "AKIDenv": "env-key",
        "AKIDflag": "flag:key:with:colons",
        "AKIDfile": "file-key",
    }


def test_bad_credential_line_names_the_place_not_the_key(tmp_path: Path) -> None:
    creds_file = tmp_path / "creds"
    creds_file.write_text("AKIDok:ok\nsupersecretwithoutid\n")
    with pytest.raises(ValueError, match=r"creds:2") as info:
        load_credentials(environ={}, files=[creds_file])
    assert "supersecret" not in str(info.value)


def test_knob_coercion() -> None:
    knobs = apply_knobs(
        Knobs(),
        {
            "quota_per_s": "5",
            "reset": "0.25",
            "warning_service_disabled": "true",
            "force_error_code": "",
        },
    )
    assert (
        knobs.quota_per_s,
        knobs.reset,
        knobs.warning_service_disabled,
        knobs.force_error_code,
    ) == (5, 0.25, True, None)
    with pytest.raises(KnobError, match="latency_tail_prob"):
        apply_knobs(Knobs(), {"latency_tail_prob": -0.1})
    with pytest.raises(KnobError, match="quota_per_s"):
        apply_knobs(Knobs(), {"quota_per_s": True})


def test_serve_in_thread() -> None:
    from emulator.config import EmulatorConfig
    from emulator.server import serve_in_thread

    running = serve_in_thread(EmulatorConfig(credentials={"AKIDthread": "thread-key"}))
    try:
        emu = EmulatorProcess(
            url=running.url,
            secret_id="AKIDthread",
            secret_key="thread-key",
            process=None,  # type: ignore[arg-type]
            log_path=Path("/dev/null"),
        )  # type: ignore[arg-type]
        assert call(emu, "AKIDthread", "thread-key")["ID"] == CARD.truth["ID"]
    finally:
        running.stop()
    assert not running.thread.is_alive()
