"""A bounded schemathesis run over the OpenAPI schema: valid and invalid inputs, never a 5xx,
and every error is the JSON `{"detail", "code"}` body."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.slow
schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture
def api_schema(live):
    loaded = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
    )
    return loaded


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call(timeout=20)
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"detail", "code"} and body["detail"]
        assert "Traceback" not in response.text
