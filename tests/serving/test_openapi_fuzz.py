"""GET /openapi.json, and schemathesis against it on a live tiny-model server: no response
>= 500 for any generated request, and the server healthy afterwards (no unhandled error in
its log)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from shoal.api.openapi import build_openapi
from tests.serving.api_helpers import TIMEOUT_S, running_server
from tests.serving.conftest import ServeProcess

# Examples per operation: enough to hit every field with odd values, small enough that the
# whole module stays well under a minute on a shared 2-core machine.
EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def server(tiny_model_dir: str) -> Iterator[ServeProcess]:
    # A short context keeps generated requests quick (max_tokens is bounded by it).
    with running_server(tiny_model_dir, "--max-model-len", "48") as server:
        yield server


def test_the_document_lists_every_route_with_schemas(url: str) -> None:
    document = httpx.get(f"{url}/openapi.json", timeout=TIMEOUT_S).json()
    assert document == build_openapi(api_key=False)
    assert document["openapi"].startswith("3.1")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(
        document["paths"]
    )
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    # Optional since `prompt_embeds` may stand in for it (a 400 names it when both lack).
    completion = document["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "prompt_embeds"} <= set(completion)
    secured = build_openapi(api_key=True)
    assert secured["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]


def test_generated_requests_never_get_a_server_error(url: str, server: ServeProcess) -> None:
    document = httpx.get(f"{url}/openapi.json", timeout=TIMEOUT_S).json()
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in document["paths"].values())
    seen: list[tuple[str, int]] = []
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            # No shrinking: a live server makes each example slow, and the failing case
            # itself is in the assertion message.
            phases=[Phase.explicit, Phase.generate],
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=url, timeout=TIMEOUT_S)
            seen.append((case.operation.path, response.status_code))
            assert response.status_code < 500, (case.body, response.text)
            assert "Traceback" not in response.text

        check()
    assert len({path for path, _ in seen}) == len(operations)
    assert any(status == 200 for _, status in seen)
    assert any(status == 400 for _, status in seen)
    assert httpx.get(f"{url}/health", timeout=TIMEOUT_S).status_code == 200
    assert "unhandled error" not in server.log
