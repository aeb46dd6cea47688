"""A bounded schemathesis run over the OpenAPI schema: valid and invalid inputs, never a 5xx,
and every error is the JSON `{"detail", "code"}` body; once on an open instance, once on one
with API and admin keys (sent, and then left out: every protected operation is a 401)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from conftest import ADMIN_KEY, API_KEY  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.slow
schema = schemathesis.pytest.from_fixture("api_schema")
keyed_schema = schemathesis.pytest.from_fixture("keyed_api_schema")
OPEN_PATHS = {"/health", "/ready"}


def _load(url: str):
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
    )
    return loaded


@pytest.fixture
def api_schema(live):
    return _load(live.url)


@pytest.fixture
def keyed_api_schema(keyed_live):
    return _load(keyed_live.url)


def _check(case, response) -> None:
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"detail", "code"} and body["detail"]
        assert "Traceback" not in response.text


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    _check(case, case.call(timeout=20))


@keyed_schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_with_keys(case):
    key = ADMIN_KEY if case.path.startswith("/admin") else API_KEY
    _check(case, case.call(headers={"X-API-Key": key}, timeout=20))
    if case.path not in OPEN_PATHS:
        response = case.call(headers={"X-API-Key": "not-the-key"}, timeout=20)
        _check(case, response)
        expected = 401 if case.method == case.operation.method.upper() else 405  # TRACE...
        assert response.status_code == expected, (case.method, case.path, response.text[:300])
