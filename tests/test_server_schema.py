"""schemathesis against the server's own OpenAPI schema: no 5xx, responses that match it."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_server_support import API_KEY, running_server

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# The Responses and Anthropic routes become the chat request fuzzed above; their nested schemas
# cost hypothesis seconds per dozen examples, so they get half as many.
EXAMPLES = {"POST /v1/responses": 6, "POST /v1/messages": 6, "POST /v1/messages/count_tokens": 6}


@pytest.fixture(scope="module")
def server():
    with running_server() as (url, state):
        yield url


def test_fuzzed_bodies_never_break_the_server(server):
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    failures = []
    for operation in schema.get_all_operations():
        operation = operation.ok()

        @settings(
            max_examples=EXAMPLES.get(operation.label, 12),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case):
            if isinstance(case.body, dict):
                # Fuzz the validation, not the patience: generation stays a few tokens long.
                case.body.pop("max_completion_tokens", None)
                case.body["max_tokens"] = 4
                if "input" in case.body:  # /v1/responses names it differently
                    case.body["max_output_tokens"] = 4
            response = case.call(headers={"Authorization": f"Bearer {API_KEY}"})
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except Exception as error:  # collect every operation's failure, not just the first
            import traceback

            failures.append(
                f"{operation.label}: {''.join(traceback.format_exception(error))[-3000:]}"
            )
    assert not failures, "\n\n".join(failures)
