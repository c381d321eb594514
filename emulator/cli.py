"""`macao-ocr emulator` / `python -m emulator`, and `macao-ocr specimen`.

Kept light at import (typer only) because worker/cli registers these commands on start;
aiohttp and Pillow load when a command runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

_ENV = "MACAO_OCR_EMULATOR_"


def _env(name: str) -> str:
    return _ENV + name.upper()


def serve(
    port: Annotated[
        int, typer.Option(envvar=_env("port"), help="TCP port (0: any free port).")
    ] = 8089,
    host: Annotated[
        str, typer.Option(envvar=_env("host"), help="Interface to listen on.")
    ] = "127.0.0.1",
    credential: Annotated[
        list[str] | None,
        typer.Option("--credential", help="An accepted SECRET_ID:SECRET_KEY pair (repeatable)."),
    ] = None,
    credentials_file: Annotated[
        list[Path] | None,
        typer.Option("--credentials-file", help="File of SECRET_ID:SECRET_KEY lines (repeatable)."),
    ] = None,
    quota_per_s: Annotated[
        int,
        typer.Option(envvar=_env("quota_per_s"), help="Calls per SecretId per second; 0 = off."),
    ] = 0,
    latency_median_ms: Annotated[float, typer.Option(envvar=_env("latency_median_ms"))] = 0.0,
    latency_sigma: Annotated[
        float, typer.Option(envvar=_env("latency_sigma"), help="Lognormal sigma of latency.")
    ] = 0.0,
    latency_tail_prob: Annotated[float, typer.Option(envvar=_env("latency_tail_prob"))] = 0.0,
    latency_tail_mult: Annotated[float, typer.Option(envvar=_env("latency_tail_mult"))] = 10.0,
    ocr_failed: Annotated[
        float, typer.Option(envvar=_env("ocr_failed"), help="P(FailedOperation.OcrFailed).")
    ] = 0.0,
    download_error: Annotated[
        float, typer.Option(envvar=_env("download_error"), help="P(FailedOperation.DownLoadError).")
    ] = 0.0,
    internal_error: Annotated[
        float, typer.Option(envvar=_env("internal_error"), help="P(InternalError).")
    ] = 0.0,
    reset: Annotated[
        float, typer.Option(envvar=_env("reset"), help="P(connection closed without answer).")
    ] = 0.0,
    http_502: Annotated[
        float, typer.Option(envvar=_env("http_502"), help="P(HTTP 502, no Tencent body).")
    ] = 0.0,
    force_error_code: Annotated[
        str | None,
        typer.Option(envvar=_env("force_error_code"), help="Every valid call answers this code."),
    ] = None,
    warning_service_disabled: Annotated[
        bool, typer.Option(envvar=_env("warning_service_disabled"), help="Answer -9109 always.")
    ] = False,
    portrait_enabled: Annotated[
        bool,
        typer.Option(
            "--portrait-enabled/--portrait-disabled",
            envvar=_env("portrait_enabled"),
            help="Return RetImage when Config asks for it.",
        ),
    ] = True,
    json_charset: Annotated[
        bool, typer.Option(envvar=_env("json_charset"), help="Answer with '; charset=utf-8'.")
    ] = False,
    seed: Annotated[
        int | None, typer.Option(envvar=_env("seed"), help="Seed for fault and latency draws.")
    ] = None,
    control_token: Annotated[
        str | None,
        typer.Option(
            envvar=_env("token"),
            help="Token the /__emulator__/ control endpoints require in X-Emulator-Token "
            "(unset: they are closed). Prefer the variable: the command line is public.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the Tencent RecognizeMacaoIDCardOCR emulator (reads specimen cards)."""
    from emulator.config import EmulatorConfig, KnobError, Knobs, apply_knobs, load_credentials
    from emulator.server import run

    try:
        creds = load_credentials(
            environ=os.environ, pairs=credential or (), files=credentials_file or ()
        )
        knobs = apply_knobs(
            Knobs(),
            {
                "quota_per_s": quota_per_s,
                "latency_median_ms": latency_median_ms,
                "latency_sigma": latency_sigma,
                "latency_tail_prob": latency_tail_prob,
                "latency_tail_mult": latency_tail_mult,
                "ocr_failed": ocr_failed,
                "download_error": download_error,
                "internal_error": internal_error,
                "reset": reset,
                "http_502": http_502,
                "force_error_code": force_error_code,
                "warning_service_disabled": warning_service_disabled,
                "portrait_enabled": portrait_enabled,
                "json_charset": json_charset,
            },
        )
    except (KnobError, ValueError, OSError) as exc:
        typer.echo(f"emulator: {exc}", err=True)
        raise typer.Exit(2) from None
    config = EmulatorConfig(credentials=creds, knobs=knobs, seed=seed, control_token=control_token)
    run(config, host, port, sys.stdout)


def specimen(
    out: Annotated[Path, typer.Argument(help="Where to write the card image.")],
    seed: Annotated[int | None, typer.Option(help="Same seed, same card.")] = None,
    warn: Annotated[
        list[str] | None,
        typer.Option(
            "--warn",
            help="Card defect to draw: covered, photocopy, screen_recapture, "
            "tampered, glare, blurry (repeatable).",
        ),
    ] = None,
    png: Annotated[bool, typer.Option("--png", help="PNG instead of JPEG.")] = False,
    no_expiry: Annotated[
        bool, typer.Option("--no-expiry", help="Holder aged 60+: no expiry date.")
    ] = False,
    non_permanent: Annotated[
        bool, typer.Option("--non-permanent", help="A non-permanent resident's card.")
    ] = False,
    truth: Annotated[
        bool, typer.Option("--truth", help="Print the fields Tencent would return, as JSON.")
    ] = False,
    field: Annotated[
        list[str] | None,
        typer.Option(
            "--field",
            help="NAME=VALUE: answer this field as given, e.g. ID=9234567(8) (repeatable).",
        ),
    ] = None,
    valid_today: Annotated[
        bool, typer.Option("--valid-today", help="Dates moved so the card is valid today.")
    ] = False,
) -> None:
    """Write a specimen Macao ID card image (invented person, marked SPECIMEN)."""
    from datetime import date

    from emulator.specimen import make_specimen

    try:
        fields = {}
        for item in field or ():
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--field takes NAME=VALUE, not {item[:40]!r}")
            fields[name.strip()] = value
        spec = make_specimen(
            seed,
            warnings=warn or (),
            fmt="PNG" if png else "JPEG",
            no_expiry=no_expiry,
            permanent=not non_permanent,
            valid_on=date.today() if valid_today else None,
            fields=fields,
        )
    except ValueError as exc:
        typer.echo(f"specimen: {exc}", err=True)
        raise typer.Exit(2) from None
    out.write_bytes(spec.image)
    if truth:
        typer.echo(json.dumps(spec.truth, ensure_ascii=False, indent=2))


def register(app: typer.Typer) -> None:
    """Add `emulator` and `specimen` to a typer app."""
    app.command("emulator")(serve)
    app.command("specimen")(specimen)


def main() -> None:
    """`python -m emulator [options]`: the emulator server alone."""
    standalone = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    standalone.command()(serve)
    standalone()
