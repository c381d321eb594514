"""docker-compose.yml and the Dockerfile: structure, wiring, and that every command exists.

No Docker engine runs here; `docker compose config -q` (or the v1 `docker-compose`) validates
the file client-side when a compose client is installed, and is skipped otherwise, except under
CI=true with a client present.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from worker.cli import app as cli_app
from worker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
APP_SERVICES = {"migrate", "emulator", "worker", "flower", "api"}
_VAR = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")
# What `docker compose up` needs from the user: every secret, none defaulted.
REQUIRED = {
    "POSTGRES_PASSWORD": "pg-s3cret",
    "REDIS_PASSWORD": "redis-s3cret",
    "MACAO_OCR_FLOWER_PASSWORD": "flower-s3cret",
    "TENCENTCLOUD_SECRET_ID": "AKIDcompose",
    "TENCENTCLOUD_SECRET_KEY": "compose-key",
    "MACAO_OCR_DATA_KEYS": "compose:" + "A" * 43 + "=",
    "MACAO_OCR_LOOKUP_KEY": "B" * 43 + "=",
}
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b|_KEYS")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against `env`."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return _VAR.sub(one, value)


def resolve_command(tokens: list[str]) -> Any:
    """Walk the CLI's command tree along `tokens` and check each option exists there.

    Duck-typed on purpose: recent typer versions ship their own click, whose classes are not
    the `click` package's.
    """
    command: Any = typer.main.get_command(cli_app)
    ctx = command.context_class(command)
    rest = list(tokens)
    while rest and not rest[0].startswith("-"):
        # typer collapses an app with a single command into that command: then no name resolves.
        getter = getattr(command, "get_command", None)
        sub = getter(ctx, rest[0]) if getter is not None else None
        assert sub is not None, f"`macao-ocr {' '.join(tokens)}`: no command {rest[0]!r}"
        command, rest = sub, rest[1:]
        ctx = type(ctx)(command, parent=ctx)
    known = {opt for param in command.params for opt in getattr(param, "opts", [])}
    for token in rest:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            assert name in known, f"`macao-ocr {' '.join(tokens)}`: no option {name}"
    return command


# ------------------------------------------------------------------------- compose structure


def test_services_present(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "postgres", *APP_SERVICES}


def test_app_services_built_from_repo_dockerfile(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context).resolve() == ROOT, name
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (ROOT / context / dockerfile).is_file(), name


def test_healthchecks(services: dict[str, Any]) -> None:
    redis_test = " ".join(services["redis"]["healthcheck"]["test"])
    assert "redis-cli" in redis_test and "ping" in redis_test
    pg_test = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in pg_test
    for name in ("emulator", "worker", "flower", "api"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_healthchecks_probe_the_ports_the_services_listen_on(services: dict[str, Any]) -> None:
    worker_port = services["worker"]["environment"]["MACAO_OCR_METRICS_PORT"]
    assert f":{worker_port}/metrics" in " ".join(services["worker"]["healthcheck"]["test"])
    emulator_port = _option(services["emulator"]["command"], "--port")
    assert f":{emulator_port}/" in " ".join(services["emulator"]["healthcheck"]["test"])
    flower_port = _option(services["flower"]["command"], "--port")
    assert f":{flower_port}/healthcheck" in " ".join(services["flower"]["healthcheck"]["test"])
    api_port = _option(services["api"]["command"], "--port")
    assert f":{api_port}/readyz" in " ".join(services["api"]["healthcheck"]["test"])


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_postgres_has_a_named_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    volumes = services["postgres"]["volumes"]
    named = [v.split(":", 1)[0] for v in volumes if not v.startswith((".", "/"))]
    assert named, "postgres data must live in a named volume"
    assert set(named) <= set(compose.get("volumes") or {})


def test_depends_on_conditions(services: dict[str, Any]) -> None:
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["migrate"]["condition"] == "service_completed_successfully"
    assert worker_deps["redis"]["condition"] == "service_healthy"
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    # A one-shot job must not be restarted after it completed.
    assert str(services["migrate"].get("restart", "no")) == "no"


def test_commands_exist_in_the_cli(services: dict[str, Any]) -> None:
    expected = {
        "migrate": ["db", "upgrade"],
        "emulator": ["emulator"],
        "worker": ["worker"],
        "flower": ["flower"],
        "api": ["api"],
    }
    for name, prefix in expected.items():
        command = services[name]["command"]
        assert command[: len(prefix)] == prefix, name
        resolve_command(command)
    assert _option(services["emulator"]["command"], "--host") == "0.0.0.0"
    assert _option(services["api"]["command"], "--host") == "0.0.0.0"
    api_deps = services["api"]["depends_on"]
    assert api_deps["migrate"]["condition"] == "service_completed_successfully"


def test_resolve_command_rejects_what_does_not_exist() -> None:
    with pytest.raises(AssertionError, match="no command"):
        resolve_command(["no-such-command"])
    with pytest.raises(AssertionError, match="no option"):
        resolve_command(["demo", "--no-such-option"])


def test_worker_environment(services: dict[str, Any]) -> None:
    env = services["worker"]["environment"]
    for var in ("MACAO_OCR_DATABASE_URL", "MACAO_OCR_BROKER_URL", "MACAO_OCR_API_ENDPOINT"):
        assert var in env
    resolved = {k: interpolate(str(v), REQUIRED) for k, v in env.items()}
    assert resolved["MACAO_OCR_API_ENDPOINT"] == "http://emulator:8089"
    assert resolved["MACAO_OCR_BROKER_URL"] == "redis://:redis-s3cret@redis:6379/0"
    assert resolved["MACAO_OCR_DATABASE_URL"].startswith("postgresql://macao:pg-s3cret@postgres:")
    # Credentials come from the user, never from the file.
    for var in ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY"):
        match = _VAR.fullmatch(str(env[var]))
        assert match and match["name"] == var and match["op"] == ":?" and match["arg"], var
    # The emulator accepts exactly the pair the worker signs with.
    emulator_env = services["emulator"]["environment"]
    for var in ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY"):
        assert emulator_env[var] == env[var]


def test_every_app_environment_is_valid_settings(services: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name in APP_SERVICES:
        env = {k: interpolate(str(v), REQUIRED)
               for k, v in services[name]["environment"].items()}  # fmt: skip
        for var in env:
            if var.startswith("MACAO_OCR_") and not var.startswith("MACAO_OCR_EMULATOR_"):
                field = var.removeprefix("MACAO_OCR_").lower()
                assert field in fields, f"{name}: {var} is no setting"
        # What the container will build from that environment validates.
        settings = _settings_from(env)
        assert settings.database_url.startswith("postgresql+psycopg://")


def _settings_from(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith(("MACAO_OCR_", "TENCENTCLOUD_"))]:
            del os.environ[key]
        os.environ.update(env)
        return load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_flower_requires_a_password(services: dict[str, Any]) -> None:
    env = services["flower"]["environment"]
    match = _VAR.fullmatch(str(env["MACAO_OCR_FLOWER_PASSWORD"]))
    assert match and match["op"] == ":?", "the password must be required, not defaulted"
    with pytest.raises(KeyError, match="MACAO_OCR_FLOWER_PASSWORD"):
        interpolate(str(env["MACAO_OCR_FLOWER_PASSWORD"]), {})


def test_published_ports_are_configurable(services: dict[str, Any]) -> None:
    for name in ("worker", "emulator", "flower", "api"):
        for mapping in services[name].get("ports", []):
            host, container = str(mapping).rsplit(":", 1)
            assert _VAR.search(host), f"{name}: host port {host} is hard-coded"
            assert container.isdigit()


def test_only_flower_and_the_api_are_published_and_only_on_loopback(
    services: dict[str, Any],
) -> None:
    # Redis, PostgreSQL, the metrics and the emulator stay on the compose network.
    for name in ("redis", "postgres", "worker", "emulator", "migrate"):
        assert not services[name].get("ports"), f"{name} publishes {services[name]['ports']}"
    for name in ("flower", "api"):
        mappings = services[name]["ports"]
        assert mappings
        for mapping in mappings:
            assert isinstance(mapping, str) and mapping.startswith("127.0.0.1:"), mapping


def _all_strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _all_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _all_strings(v)]
    return [str(node)] if node is not None else []


def test_no_secret_has_a_default(compose: dict[str, Any]) -> None:
    used = {m["name"]: m for text in _all_strings(compose) for m in _VAR.finditer(text)}
    secrets = {name: m for name, m in used.items() if _SECRET_NAME.search(name)}
    assert set(REQUIRED) <= set(secrets), "the test's list of secrets is stale"
    for name, match in secrets.items():
        # Required, with a message saying what to set.
        assert match["op"] == ":?" and match["arg"].strip(), f"{name} must be ${{{name}:?message}}"
        with pytest.raises(KeyError, match=name):
            interpolate(match.group(0), {})
    # ...and no password is written into the file in clear either.
    env_values = [
        str(v)
        for service in compose["services"].values()
        for k, v in (service.get("environment") or {}).items()
        if _SECRET_NAME.search(k)
    ]
    assert all(_VAR.fullmatch(v) for v in env_values), env_values


def test_redis_requires_its_password(services: dict[str, Any]) -> None:
    command = " ".join(services["redis"]["command"])
    assert "requirepass" in command
    # Through a file: redis-server's command line is visible to every user of the host.
    assert "--requirepass" not in command
    assert "PONG" in " ".join(services["redis"]["healthcheck"]["test"])


def test_listening_addresses_inside_the_containers(services: dict[str, Any]) -> None:
    # The metrics stay reachable on the compose network, for a Prometheus added there.
    assert services["worker"]["environment"]["MACAO_OCR_METRICS_HOST"] == "0.0.0.0"
    # The emulator is plain http on the compose network: the override is explicit.
    allow = _VAR.fullmatch(
        str(services["worker"]["environment"]["MACAO_OCR_ALLOW_INSECURE_ENDPOINT"])
    )
    assert allow and allow["name"] == "MACAO_OCR_ALLOW_INSECURE_ENDPOINT"


# ----------------------------------------------------------------------------- the Dockerfile


def _dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_base_user_and_entrypoint() -> None:
    lines = _dockerfile_lines()
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(image == "python:3.11-slim" for image in froms)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert "macao-ocr" in entry


def test_dockerfile_copies_every_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    copied = {
        line.split()[1].rstrip("/")
        for line in _dockerfile_lines()
        if line.startswith("COPY ") and "--from" not in line
    }
    for package in packages:
        assert package in copied, f"the Dockerfile does not copy {package}/"
        assert (ROOT / package).is_dir()
    for source in ("pyproject.toml", pyproject["project"]["readme"]):
        assert any(source in line for line in _dockerfile_lines() if line.startswith("COPY "))


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    for entry in (".git", ".venv", ".env", "*.db"):
        assert entry in ignored, entry
    for package in ("worker", "models", "migrations", "emulator"):
        assert package not in ignored


# ------------------------------------------------------------------- a real compose client


def _compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MACAO_OCR_", "TENCENTCLOUD_"))}
    env.update(extra)
    return env


def test_compose_config_validates() -> None:
    client = _compose_client()
    if client is None:
        message = "no docker compose client installed (.ci/run installs docker-compose)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    ok = subprocess.run(
        [*client, "-f", str(COMPOSE), "config", "-q"],
        env=_compose_env(**REQUIRED),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    for name in REQUIRED:
        without = {k: v for k, v in REQUIRED.items() if k != name}
        missing = subprocess.run(
            [*client, "-f", str(COMPOSE), "config", "-q"],
            env=_compose_env(**without),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert missing.returncode != 0, name
        assert name in missing.stderr


def test_only_the_services_that_hold_personal_data_get_the_keys(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        env = services[name]["environment"]
        holds = name in {"migrate", "worker", "api"}
        for key in ("MACAO_OCR_DATA_KEYS", "MACAO_OCR_LOOKUP_KEY"):
            assert (key in env) == holds, (name, key)
