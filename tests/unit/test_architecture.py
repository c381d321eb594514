"""The house's rules, read from the code's imports (every import, in functions too; those
under `if TYPE_CHECKING:` excepted, as they never run).

- no circle among the modules of worker/, demo/, emulator/ and models/;
- the concept packages (tencent, quota, store, broker) never import the modules that compose
  them (pipeline, sweeper, app, cli...): arrows point down;
- Celery's and kombu's internals are reached only from worker/broker/ (and the app's public
  Celery API from worker/app.py);
- worker code never imports `emulator` or `demo`, except the CLI, the composition root;
- worker/settings.py, which nearly every module imports, leans only on a few named leaves
  (modules that import nothing of ours but each other), never on a package of worker/;
- a production install has neither fakeredis nor lupa (the demo's), and needs neither.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "demo", "emulator", "models")
CONCEPTS = ("worker.tencent", "worker.quota", "worker.store", "worker.broker")
COMPOSERS = (
    "worker.pipeline",
    "worker.sweeper",
    "worker.replay",
    "worker.runtime",
    "worker.producer",
    "worker.service",
    "worker.app",
    "worker.cli",
    "worker.metrics",
)
# What worker/settings.py may import of ours: leaves, so the settings stay under every package
# (the warning policy is checked at load against the reason codes, without worker.decision).
SETTINGS_LEAVES = ("worker.errors", "worker.policy_text", "worker.reason_codes")
# Celery's public surface as the rest of worker/ may use it.
PUBLIC_CELERY = {"celery", "celery.signals", "celery.exceptions"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module `path` imports (the most precise name known), TYPE_CHECKING aside."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield full if full in known else node.module


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports(path, known)) for name, path in known.items()}


def _in(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_circle() -> None:
    edges = graph()
    internal = {m: {t for t in ts if t in edges} for m, ts in edges.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(internal[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(internal):
        if start not in state and (circle := visit(start)):
            raise AssertionError(" -> ".join(circle))


def test_concept_packages_never_import_what_composes_them() -> None:
    upward = sorted(
        f"{m} -> {t}"
        for m, ts in graph().items()
        if _in(m, CONCEPTS)
        for t in ts
        if _in(t, COMPOSERS)
    )
    assert upward == []


def test_settings_import_only_the_named_leaves() -> None:
    edges = graph()
    reached = sorted(
        f"worker.settings -> {t}"
        for t in edges["worker.settings"]
        if _in(t, PACKAGES) and t not in SETTINGS_LEAVES
    )
    assert reached == []
    # ...and those stay leaves: nothing of ours but each other.
    beyond = sorted(
        f"{leaf} -> {t}"
        for leaf in SETTINGS_LEAVES
        for t in edges[leaf]
        if _in(t, PACKAGES) and t not in SETTINGS_LEAVES
    )
    assert beyond == []


def test_celery_and_kombu_internals_only_behind_the_broker_door() -> None:
    reached = sorted(
        f"{m} -> {t}"
        for m, ts in graph().items()
        if m.startswith("worker") and not _in(m, ("worker.broker",))
        for t in ts
        if (t == "kombu" or t.startswith("kombu.") or t.startswith("celery"))
        and t not in PUBLIC_CELERY
    )
    assert reached == []


def test_worker_code_never_imports_the_emulator_or_the_demo() -> None:
    reached = sorted(
        f"{m} -> {t}"
        for m, ts in graph().items()
        if m.startswith("worker") and not _in(m, ("worker.cli",))
        for t in ts
        if _in(t, ("emulator", "demo"))
    )
    assert reached == []


def test_a_production_install_needs_no_demo_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "fakeredis" not in core and "lupa" not in core
    assert any("fakeredis" in d for d in project["optional-dependencies"]["demo"])
    reached = sorted(
        f"{m} -> {t}"
        for m, ts in graph().items()
        if _in(m, ("worker", "models", "emulator"))
        for t in ts
        if _in(t, ("fakeredis", "lupa"))
    )
    assert reached == []


def test_the_cli_runs_without_the_demo_dependencies() -> None:
    """`macao-ocr worker --help` with fakeredis and lupa made unimportable, as in a plain
    `pip install macao-ocr`."""
    blocker = (
        "import sys\n"
        "sys.modules['fakeredis'] = None\n"
        "sys.modules['lupa'] = None\n"
        "from worker.cli import app\n"
        "sys.argv = ['macao-ocr', 'worker', '--help']\n"
        "app()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--processes" in done.stdout
