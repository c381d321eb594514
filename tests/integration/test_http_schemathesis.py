"""Property-based tests generated from the service's own OpenAPI document (schemathesis):
against a running `macao-ocr api`, every operation, with a valid key: no 5xx, and every
answer's status, content type, headers and body match the document.

The document is built in process at collection (schemathesis' `from_fixture` does not run on
pytest 9), and the first test checks the running server serves exactly that document."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from schemathesis import checks

from tests.conftest import drop_database
from tests.fixtures.api_server import ApiServer, create_tenant, start_api_server
from tests.fixtures.database import new_migrated_database
from tests.fixtures.workers import TEST_DEFAULTS
from worker.broker.publish import RecordingPublisher
from worker.http.app import create_app
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def deployment(
    pg_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ApiServer, str]]:
    """One server for every operation (no worker: jobs stay queued), dropped afterwards."""
    url = new_migrated_database(pg_admin_url)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    env = {
        **TEST_DEFAULTS,
        "MACAO_OCR_DATABASE_URL": url,
        "MACAO_OCR_BROKER_URL": redis_url,
        # Backpressure on, with room for what the tests submit.
        "MACAO_OCR_QPS": "5",
    }
    server = start_api_server(env, tmp_path_factory.mktemp("api"))
    try:
        yield server, create_tenant(env, "fuzz")
    finally:
        server.stop()
        drop_database(pg_admin_url, url)
        client.flushdb()
        client.close()


def _document() -> dict[str, Any]:
    config = Settings(
        database_url="sqlite://", data_keys=SecretStr(TEST_DEFAULTS["MACAO_OCR_DATA_KEYS"])
    )
    app = create_app(config, publisher=RecordingPublisher())
    try:
        return app.openapi()
    finally:
        app.state.services.close()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_server_serves_this_document(deployment: tuple[ApiServer, str]) -> None:
    import requests

    server, _ = deployment
    served = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert served == DOCUMENT
    assert served["openapi"].startswith("3.1")


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_conforms(case: Any, deployment: tuple[ApiServer, str]) -> None:
    server, key = deployment
    case.call_and_validate(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, checks=CHECKS
    )
