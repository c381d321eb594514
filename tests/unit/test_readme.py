"""The README is a contract: every setting documented, its test command the one CI runs."""

from __future__ import annotations

from pathlib import Path

from worker.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented() -> None:
    missing = [env_name(f) for f in Settings.model_fields if env_name(f) not in README]
    assert missing == []


def test_ci_runs_the_readme_test_command() -> None:
    readme_cmd = README.split("Run the tests", 1)[1].split("\n\n", 2)[1].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    tail = readme_cmd.split("&& ", 2)[2]  # after venv creation and install
    assert tail in ci
