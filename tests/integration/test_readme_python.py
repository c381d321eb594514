"""The README's Python example runs as written: a real worker reads the card it submits."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator.specimen import make_specimen

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def python_example() -> str:
    section = README.split("From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


@pytest.fixture
def in_env(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    saved = dict(os.environ)
    cwd = Path.cwd()
    os.environ.update(worker_env)
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)


def test_the_readme_example_reads_a_card(
    in_env: Path,
    worker_env: dict[str, str],
    celery_workers: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    specimen = make_specimen(seed=42)
    (in_env / "card.jpg").write_bytes(specimen.image)
    celery_workers(worker_env)
    exec(compile(python_example(), "README.md", "exec"), {})
    # The example's print is the last line (the producer's own log lines may come before it).
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert printed[0] == "succeeded", printed
    assert " ".join(printed[1:]) == specimen.truth["ResidentType"]
