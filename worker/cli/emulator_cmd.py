"""`macao-ocr emulator` and `macao-ocr specimen`: the local Tencent stand-in (dev/test tooling).

The commands live in the emulator package; the CLI, the composition root, registers them
here (and the demo's in `worker.cli`); no other worker code imports `emulator` or `demo`.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    from emulator import cli as emulator_cli  # imports typer only; aiohttp/Pillow load on use

    emulator_cli.register(app)
